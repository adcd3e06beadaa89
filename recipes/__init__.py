"""The bundled recipes (import name ``sdsctl_recipes``): ``sdsctl recipes`` lists them and
``sdsctl run NAME`` runs one by name. Each file's first comment line is its description."""
