"""Ray batch jobs over the catversion library: manifest schema and validation, the Ray Train job, results."""
