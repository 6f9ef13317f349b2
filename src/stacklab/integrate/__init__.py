"""The integration engine: decide, by measurement, which contributions go into the model."""
