"""What the API, the worker and the command line share: settings, database, storage, job lifecycle."""
