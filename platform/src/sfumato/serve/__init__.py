"""Ray Serve: an HTTP ingress (FastAPI) and a model deployment, composed with .bind()."""
