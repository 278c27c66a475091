"""GaLore as a frozen-projector adapter (any ZeRO stage): the method (``method``), its linear
(``adapter``), gradient captures for a refresh (``capture``, ``sketch``), options and the cost
model that picks each linear's forward path (``options``, ``cost``)."""
