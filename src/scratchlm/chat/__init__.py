"""Chat: the template that turns conversations into tokens (`template.py`) and the terminal chat
(`terminal.py`)."""
