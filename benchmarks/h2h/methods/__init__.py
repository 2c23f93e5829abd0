"""The head-to-head methods, one module per kind; each module registers its methods (registry.register)."""
