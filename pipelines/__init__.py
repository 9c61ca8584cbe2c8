"""Ray jobs over the catversion library: manifest schema and validation, the Ray Train batch job, evaluation."""
