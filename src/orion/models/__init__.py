"""Language models on Orion: Hugging Face folders (or hub ids) in, weights, tokenizer and sampled text out."""
