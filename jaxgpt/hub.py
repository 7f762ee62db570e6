"""What makes an exported folder ready for the Hugging Face Hub, besides the weights: the tokenizer files
transformers' AutoTokenizer loads, generation_config.json, the chat template, and the upload itself.

Every tokenizer kind is written as a tokenizer.json (`Tokenizer.to_hugging_face`), so AutoTokenizer loads
a `PreTrainedTokenizerFast` that encodes as the run did. SentencePiece and tiktoken runs also get BOS put
in front of each text, as jaxgpt puts it in front of every document and prompt; a base model's own
tokenizer.json keeps its own convention (GPT-2 adds nothing, Llama 3 adds <|begin_of_text|>). A run trained
on Alpaca, chat or preference data gets a Jinja `chat_template` that renders messages exactly as its
data.template did, and its end marker (when it is one token) as an end-of-sequence id, so `generate` stops
where it was trained to.
"""

import json

import tokenizers

from jaxgpt import paths
from jaxgpt.config import JaxgptError, require_extra
from jaxgpt.data.tokenizer import Tokenizer

GENERATION_CONFIG = 'generation_config.json'


def tokenizer_files(tokenizer: Tokenizer, config) -> dict[str, str]:
  """tokenizer.json and tokenizer_config.json (with the chat template of an instruction-tuned run)."""
  hf = tokenizer.to_hugging_face()
  if tokenizer.kind != 'byte_bpe':
    hf.post_processor = tokenizers.processors.TemplateProcessing(
        single=f'{tokenizer.bos_token} $A', pair=f'{tokenizer.bos_token} $A $B:1',
        special_tokens=[(tokenizer.bos_token, tokenizer.bos_id)])
  settings = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': tokenizer.bos_token,
              'eos_token': tokenizer.eos_token, 'model_max_length': config.model.max_len,
              'clean_up_tokenization_spaces': False}
  if tokenizer.unk_id is not None:
    settings['unk_token'] = hf.id_to_token(tokenizer.unk_id)
  if _instruction_tuned(config):
    settings['chat_template'] = chat_template(config.data.template)
  return {'tokenizer.json': hf.to_str(), 'tokenizer_config.json': json.dumps(settings, indent=2)}


def _instruction_tuned(config) -> bool:
  return config.data.format != 'text'


def chat_template(template) -> str:
  """A Jinja chat template (transformers' apply_chat_template) rendering messages as data.template does:
  BOS, each system and user turn through its format, each assistant turn between `assistant` and `end`, and
  with add_generation_prompt, `assistant` to open the reply."""
  def text(value: str) -> str:  # a Jinja string literal: JSON's escapes are Python's, which Jinja reads
    return '{{ ' + json.dumps(value, ensure_ascii=False) + ' }}'

  turns = []
  for role in ('system', 'user'):
    parts = template[role].format(content='\0').split('\0')  # ('{{' in a format renders '{')
    if len(parts) != 2:
      raise JaxgptError(f'data.template.{role}={template[role]!r} must hold {{content}} once.')
    before, after = parts
    turns.append(f"{{% {'if' if role == 'system' else 'elif'} message['role'] == '{role}' %}}"
                 f"{text(before)}{{{{ message['content'] }}}}{text(after)}")
  turns.append(f"{{% elif message['role'] == 'assistant' %}}{text(template.assistant)}"
               f"{{{{ message['content'] }}}}{text(template.end)}")
  turns.append("{% else %}{{ raise_exception('jaxgpt chat roles are system, user and assistant') }}{% endif %}")
  return ('{{ bos_token }}{% for message in messages %}' + ''.join(turns) + '{% endfor %}'
          f'{{% if add_generation_prompt %}}{text(template.assistant)}{{% endif %}}')


def generation_config(tokenizer: Tokenizer, config) -> dict:
  """generation_config.json: BOS, EOS (and the chat end marker), padding, the context length and the run's
  sampling settings."""
  eos = [tokenizer.eos_id]
  if _instruction_tuned(config):
    end = tokenizer.encode(config.data.template.end.strip())
    if len(end) == 1 and end[0] != tokenizer.eos_id:
      eos.append(end[0])
  sample = config.sample
  return {'bos_token_id': tokenizer.bos_id, 'eos_token_id': eos if len(eos) > 1 else eos[0],
          'pad_token_id': tokenizer.eos_id, 'max_length': config.model.max_len, 'do_sample': sample.temperature > 0,
          **({'temperature': sample.temperature, 'top_k': sample.top_k} if sample.temperature > 0 else {})}


# --- the upload ----------------------------------------------------------------------------------

def check_push(repo: str, directory: str) -> str:
  """The token to push `directory` to the Hub repository `repo` with; a JaxgptError, before any work, when
  it cannot be done."""
  require_extra('hub', 'huggingface_hub')
  import huggingface_hub
  from huggingface_hub.utils import HFValidationError, validate_repo_id
  try:
    validate_repo_id(repo)
  except HFValidationError as e:
    raise JaxgptError(f'--push_to_hub={repo!r} is not a Hub repository id ({e}); give OWNER/NAME, '
                      'e.g. --push_to_hub=my-name/my-model.') from None
  if paths.is_remote(directory):
    raise JaxgptError(f'--push_to_hub uploads a local folder; --export_hf={directory} is in a bucket. '
                      'Export to a local directory to push it.')
  token = huggingface_hub.get_token()
  if not token:
    raise JaxgptError('--push_to_hub needs a Hugging Face token with write access: set HF_TOKEN in the '
                      'environment, or run `hf auth login` once.')
  return token


def push(directory: str, repo: str, token: str, private: bool, message: str) -> str:
  """Uploads the exported folder to the Hub repository `repo` (created if new); returns its URL."""
  import huggingface_hub
  api = huggingface_hub.HfApi(token=token)
  try:
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=directory, commit_message=message)
  except Exception as e:  # network, authentication, permissions: huggingface_hub's errors say which
    reason = next(iter(str(e).splitlines()), '')
    raise JaxgptError(f'uploading {directory} to the Hub repository {repo} failed ({type(e).__name__}: {reason}). '
                      f'The exported folder is complete; retry, or upload it with `hf upload {repo} {directory}`.'
                      ) from None
  return str(url)
