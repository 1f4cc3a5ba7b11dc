"""A small fixed set of English sentences for calibrating and evaluating the MiniLM workload.

Written for weightlab (no external source); varied topics and lengths. ``CALIBRATION`` and
``HELD_OUT`` do not overlap.
"""

CALIBRATION = [
    "The committee postponed its decision until next month.",
    "A child is flying a red kite on the beach.",
    "Heavy rain caused flooding in several northern towns.",
    "She solved the puzzle in under five minutes.",
    "The new phone has a larger battery and a better camera.",
    "Two dogs are chasing each other across the field.",
    "Interest rates were left unchanged by the central bank.",
    "He forgot his umbrella at the train station.",
    "The museum opened an exhibition of medieval maps.",
    "Volunteers planted three hundred trees along the river.",
    "The chef added a pinch of salt to the soup.",
    "Researchers measured the speed of the glacier's retreat.",
    "My grandmother tells the best stories about her childhood.",
    "The software update fixed a bug in the login screen.",
    "A woman is slicing tomatoes in the kitchen.",
    "The orchestra rehearsed the symphony for weeks.",
    "Traffic was slow because of roadwork on the highway.",
    "The students presented their project on renewable energy.",
    "He likes to read science fiction before going to sleep.",
    "The football match ended in a goalless draw.",
    "Prices of fresh vegetables rose sharply this winter.",
    "A cyclist waits at the red light.",
    "The library extended its opening hours during exams.",
    "Astronomers spotted a comet near the edge of the solar system.",
    "The baby laughed when the cat jumped onto the sofa.",
    "Engineers tested the bridge before opening it to traffic.",
    "The hikers reached the summit just before sunset.",
    "A new cafe opened on the corner of our street.",
    "The company reported record profits for the quarter.",
    "He repaired the old bicycle with spare parts.",
    "The teacher explained fractions using slices of pizza.",
    "Snow covered the mountains for most of the year.",
]

HELD_OUT = [
    "A man is playing a guitar on stage.",
    "Someone is performing music with an instrument.",
    "The stock market fell sharply today.",
    "Shares dropped steeply in today's trading.",
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quantum computers use qubits instead of bits.",
    "The weather is sunny and warm.",
    "He drove the car to work this morning.",
    "The government announced a new tax policy.",
    "Children are building a sandcastle.",
    "The plane landed safely despite the storm.",
    "She is learning to speak Japanese.",
    "The restaurant serves fresh seafood every day.",
    "A scientist is looking through a microscope.",
    "The river flows quietly through the valley.",
]
