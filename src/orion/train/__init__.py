"""Training Orion's own small language models (a Llama-style "Stories110M" on TinyStories): the data side turns text
into uint16 token files and reproducible, resumable batches."""
