"""The life of a job: its folder, its logs, how it reports its end to the launcher."""
