"""Settings, database and tables, storage, queue and the job lifecycle: what the API, the worker
and the model server share. Imports core only, and no HTTP framework or model code."""
