"""The configs that ship with largeloss: one YAML per dataset, one per method under methods/."""
