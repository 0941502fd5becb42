"""The HTTP adapter: one package per API dialect (its operations, models, credentials and error
shape), mounted where broker.yaml's http.mounts says (bridge/http/registry.py), and the OpenAPI
document generated from their declarations."""
