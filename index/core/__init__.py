"""The small core both the gallery and the server stand on: shared types and maths."""
