"""`kpop view`: a local web page over run directories (server.py, static/, plots.py)."""
