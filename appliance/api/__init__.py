"""HTTP APIs: the provider API (enrollment, pushes, topics) and the admin API."""
