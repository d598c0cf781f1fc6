"""``fastdpo label``: a local web page where a person compares two answers and the choice becomes
a DPO pair (``sources`` -> ``session`` -> ``store``; ``app`` serves ``page.html``)."""
