"""The backend as an HTTP service: job store, GPU worker and FastAPI routes."""
