"""DCP checkpoints: save, load, resume, checksums, folders; Hugging Face conversion."""
