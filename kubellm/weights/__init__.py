"""Weight tools, not model code: random tiny test models, downloads for the init container, the demo model."""
