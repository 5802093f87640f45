"""Model implementations in Flax NNX that load Hugging Face safetensors checkpoints
(no PyTorch, no transformers Flax classes). ``jlora.models.bert``: a BERT encoder."""
