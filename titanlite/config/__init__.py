"""Settings, declared once; TOML and the command line read into them; every derived value resolved once into a Run."""
