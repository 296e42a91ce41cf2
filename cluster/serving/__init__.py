"""Ray Serve side: the model replica deployment and the builder of the Serve application."""
