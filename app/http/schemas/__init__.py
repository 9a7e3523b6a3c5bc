"""Request and response schemas: what the API takes and answers, as `/docs` shows it."""
