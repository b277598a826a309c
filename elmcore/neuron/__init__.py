"""The single ELM neuron and Branch-ELM: config, parameters, model."""
