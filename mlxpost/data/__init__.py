"""Data files to examples: row formats and validation with file:line errors, rendering with loss masks,
tokenized examples, and conversion of public dataset layouts."""
