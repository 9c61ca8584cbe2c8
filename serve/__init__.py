"""Ray Serve application over the catversion library (HTTP ingress, generator deployment, residual cache)."""
