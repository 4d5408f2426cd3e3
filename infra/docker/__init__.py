"""What runs inside the containers besides the service: image, start script, helpers."""
