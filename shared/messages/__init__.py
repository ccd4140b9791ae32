"""Bus message schemas, one module per family; each family is one tagged union with dotted tags."""
