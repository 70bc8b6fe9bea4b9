"""The species catalog: names, taxonomy, vernacular names, its overlay and GBIF."""
