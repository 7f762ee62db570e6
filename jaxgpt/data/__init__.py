"""Data: sources, tokenizer, TFDS builder, Grain pipeline. Never imports the model."""
