"""What every dialect shares: the operation decorator, request decoding, credentials, the dialect
base class (answers, error rendering, error table) and the OpenAPI generator."""
