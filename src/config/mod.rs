//! VM configuration: the per-VM YAML schema, loading and validation.
