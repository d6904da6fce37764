"""Numbered registry schema migrations, applied in order by store.RegistryStore.migrate."""
