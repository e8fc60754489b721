"""Backbone networks, one module each, and the factory that maps names to them."""
