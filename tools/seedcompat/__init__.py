"""The BioLit seed's formats: importing its artifacts, writing its CSV."""
