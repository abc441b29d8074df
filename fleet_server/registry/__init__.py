"""Registry of bundles, models, enrollment, groups and drift profiles, and the bundle store."""
