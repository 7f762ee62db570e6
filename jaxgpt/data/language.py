"""Language identification as a cleaning filter: py3langid, whose model ships inside the package.

A document is kept when its most likely language is one of data.languages (ISO 639-1 codes such as
'en', 'de') with a probability of at least data.min_language_score; else it is dropped for 'language',
the report naming the language found and its probability. The model is loaded once per process.
"""

import functools

from jaxgpt.config import JaxgptError


@functools.cache
def _identifier():
  from py3langid.langid import MODEL_FILE, LanguageIdentifier
  return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)  # probabilities, not log-odds


def check_languages(languages) -> None:
  """One clear error for a code the model does not know."""
  known = _identifier().labels
  unknown = [code for code in languages if code not in known]
  if unknown:
    raise JaxgptError(f'data.languages: {", ".join(map(repr, unknown))} not among the {len(known)} languages '
                      f'py3langid identifies ({", ".join(known)}). Use ISO 639-1 codes such as \'en\'.')


def language_problem(text: str, data_cfg) -> tuple[str, str] | None:
  """('language', what was found) when `text` is not in one of data.languages surely enough; else None."""
  language, probability = _identifier().classify(text)
  if language in data_cfg.languages and probability >= data_cfg.min_language_score:
    return None
  return 'language', f'{language} ({probability:.2f})'
