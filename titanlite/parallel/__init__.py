"""The mesh and what lays the model over it: tensor parallel, activation checkpointing, compile, FSDP2, float8."""
