"""The ELM Network: recurrent layers of Branch-ELM neurons (config, parameters, model)."""
