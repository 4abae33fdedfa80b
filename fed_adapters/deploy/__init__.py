"""Cross-silo deployment on Flower's Deployment Engine: certificates and a loopback federation to try it."""
