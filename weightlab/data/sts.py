"""Small evaluation sets for ``weightlab eval``: sentence-pair similarity, retrieval, and a text for
perplexity.

Written for weightlab (no external source). They are meant to tell whether a quantized or merged
checkpoint still behaves like its reference, not to rank models against published benchmarks.

* ``PAIRS``: ``(sentence_a, sentence_b, score)`` with a graded similarity score from 0 (unrelated)
  to 5 (same meaning), in the spirit of STS benchmarks; the scores are our own judgement, chosen to
  spread over the whole range (ties are frequent, as in any graded set).
* ``RETRIEVAL``: ``(query, relevant_passage)`` pairs; the corpus searched is every relevant passage
  plus ``DISTRACTORS`` (:func:`retrieval_corpus`), so each query has exactly one relevant passage.
* ``LM_TEXT``: plain English paragraphs for perplexity and next-token agreement of decoders.

None of these sentences appears in :mod:`weightlab.data.sentences`.
"""

from __future__ import annotations

__all__ = ["PAIRS", "RETRIEVAL", "DISTRACTORS", "LM_TEXT", "retrieval_corpus"]

PAIRS: list[tuple[str, str, float]] = [
    ("A boy is riding a horse along the shore.", "A young rider gallops his horse on the beach.", 4.6),
    ("A boy is riding a horse along the shore.", "A girl is brushing a pony in the stable.", 2.0),
    ("A boy is riding a horse along the shore.", "The bank raised its lending rate.", 0.0),
    ("The train to the airport was delayed by an hour.", "Our airport train ran sixty minutes late.", 4.8),
    ("The train to the airport was delayed by an hour.", "The flight left on time this morning.", 1.6),
    ("The train to the airport was delayed by an hour.", "She plants tulips every autumn.", 0.0),
    ("A woman is cutting onions on a wooden board.", "Someone is chopping onions in a kitchen.", 4.2),
    ("A woman is cutting onions on a wooden board.", "A man is peeling potatoes.", 2.2),
    ("A woman is cutting onions on a wooden board.", "The satellite entered a stable orbit.", 0.0),
    ("The price of gold reached a record high.", "Gold hit an all-time high price.", 4.9),
    ("The price of gold reached a record high.", "Silver prices fell slightly this week.", 1.8),
    ("The price of gold reached a record high.", "A puppy is sleeping in a basket.", 0.0),
    ("Two children are playing football in the park.", "Kids are kicking a ball around on the grass.", 4.3),
    ("Two children are playing football in the park.", "Two adults are playing tennis indoors.", 1.8),
    ("Two children are playing football in the park.", "The recipe needs three eggs.", 0.0),
    ("The doctor told him to rest for a week.", "He was advised by his physician to take a week off.", 4.5),
    ("The doctor told him to rest for a week.", "The nurse checked the patient's temperature.", 1.6),
    ("The doctor told him to rest for a week.", "Lightning struck the old church tower.", 0.0),
    ("The company will hire two hundred engineers.", "Two hundred engineering jobs will be created by the firm.", 4.4),
    ("The company will hire two hundred engineers.", "The company closed one of its factories.", 1.4),
    ("The company will hire two hundred engineers.", "A heron stood still in the shallow water.", 0.0),
    ("A cat is chasing a mouse under the table.", "A kitten runs after a mouse beneath the table.", 4.5),
    ("A cat is chasing a mouse under the table.", "A dog is chasing a ball in the yard.", 1.9),
    ("A cat is chasing a mouse under the table.", "The parliament passed the budget.", 0.0),
    ("The concert was cancelled because of the storm.", "Bad weather forced the organisers to call off the concert.", 4.3),
    ("The concert was cancelled because of the storm.", "The band released a new album.", 1.3),
    ("The concert was cancelled because of the storm.", "He measured the width of the window.", 0.0),
    ("She is writing a letter to her brother.", "She writes to her brother.", 4.0),
    ("She is writing a letter to her brother.", "Her brother is reading a newspaper.", 1.6),
    ("She is writing a letter to her brother.", "The volcano erupted last night.", 0.0),
    ("The city opened a new bicycle lane downtown.", "A new bike lane was built in the city centre.", 4.6),
    ("The city opened a new bicycle lane downtown.", "Cars are stuck in traffic downtown.", 1.7),
    ("The city opened a new bicycle lane downtown.", "The violinist tuned her instrument.", 0.0),
    ("A man is fixing the roof of his house.", "Someone is repairing a house roof.", 4.4),
    ("A man is fixing the roof of his house.", "A man is painting the fence.", 2.3),
    ("A man is fixing the roof of his house.", "The comet will return in seventy years.", 0.0),
    ("The team won the championship after extra time.", "After extra time, the team took the title.", 4.7),
    ("The team won the championship after extra time.", "The team lost its opening game.", 2.0),
    ("The team won the championship after extra time.", "Fresh bread smells wonderful.", 0.0),
    ("The museum is closed on Mondays.", "On Mondays the museum does not open.", 4.8),
    ("The museum is closed on Mondays.", "The museum has a large collection of coins.", 1.9),
    ("The museum is closed on Mondays.", "A fisherman mended his nets.", 0.0),
    ("A plane is taking off from the runway.", "An aircraft is departing from the airport.", 4.0),
    ("A plane is taking off from the runway.", "A helicopter hovers above the hospital.", 1.8),
    ("A plane is taking off from the runway.", "She added sugar to her coffee.", 0.0),
    ("The students are taking a maths exam.", "Pupils are sitting a mathematics test.", 4.6),
    ("The students are taking a maths exam.", "The teacher is grading history essays.", 2.0),
    ("The students are taking a maths exam.", "The river froze during the night.", 0.0),
    ("Scientists discovered a new species of frog.", "A previously unknown frog species was found by researchers.", 4.7),
    ("Scientists discovered a new species of frog.", "Frogs are common in wet forests.", 2.2),
    ("Scientists discovered a new species of frog.", "The shop sells second-hand furniture.", 0.0),
    ("He lost his keys on the way home.", "On his way home he misplaced his keys.", 4.7),
    ("He lost his keys on the way home.", "He found a wallet on the bus.", 1.5),
    ("He lost his keys on the way home.", "Wheat grows well in this region.", 0.0),
    ("The software crashes when the file is too large.", "Large files make the program crash.", 4.4),
    ("The software crashes when the file is too large.", "The program was downloaded a million times.", 1.2),
    ("The software crashes when the file is too large.", "A choir sang in the cathedral.", 0.0),
    ("An old man is feeding pigeons in the square.", "An elderly man gives bread to the birds in the plaza.", 4.1),
    ("An old man is feeding pigeons in the square.", "A woman is walking her dog in the square.", 1.9),
    ("An old man is feeding pigeons in the square.", "The contract was signed yesterday.", 0.0),
]

RETRIEVAL: list[tuple[str, str]] = [
    ("How do bees make honey?",
     "Bees collect nectar from flowers, store it in wax cells and fan it with their wings until most of "
     "the water evaporates, turning it into honey."),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight much more strongly than red ones, so the "
     "daytime sky looks blue."),
    ("How long should an egg be boiled for a soft yolk?",
     "For a soft, runny yolk, lower the egg into boiling water and cook it for about six minutes."),
    ("What causes ocean tides?",
     "Tides rise and fall mainly because the Moon's gravity pulls on the oceans, with a smaller effect "
     "from the Sun."),
    ("How can I keep my bicycle chain from rusting?",
     "Wipe the chain after riding in the rain and apply a thin coat of chain oil every few weeks to keep "
     "rust away."),
    ("When did people first land on the Moon?",
     "Astronauts first walked on the surface of the Moon in July 1969 during the Apollo 11 mission."),
    ("What is the boiling point of water at sea level?",
     "At sea level, pure water boils at one hundred degrees Celsius."),
    ("How do vaccines protect the body?",
     "A vaccine trains the immune system to recognise a germ, so the body can fight it off quickly if it "
     "is exposed later."),
    ("What do pandas eat?",
     "Giant pandas feed almost entirely on bamboo, eating many kilograms of shoots and leaves each day."),
    ("How does a rainbow form?",
     "A rainbow appears when sunlight is refracted and reflected inside raindrops, splitting white light "
     "into its colours."),
    ("Why do leaves change colour in autumn?",
     "In autumn trees stop making green chlorophyll, revealing the yellow and orange pigments that were "
     "hidden in the leaves."),
    ("How often should a houseplant be watered?",
     "Most houseplants need water only when the top few centimetres of soil feel dry, often about once a "
     "week."),
    ("What is the capital of Australia?",
     "Canberra, not Sydney, is the capital city of Australia."),
    ("How do solar panels produce electricity?",
     "Solar cells are made of semiconductor layers in which sunlight frees electrons, producing an "
     "electric current."),
    ("Why do cats purr?",
     "Cats purr when they are content, but also to soothe themselves when they are stressed or hurt."),
    ("How can I fall asleep faster?",
     "Keeping a regular bedtime, avoiding screens late at night and a cool, dark room help people fall "
     "asleep sooner."),
    ("What is inflation?",
     "Inflation is the general rise in prices over time, which means each unit of money buys fewer goods."),
    ("How are mountains formed?",
     "Many mountain ranges form where tectonic plates collide and push the crust upward over millions of "
     "years."),
    ("Which planet is the largest in our solar system?",
     "Jupiter is the biggest planet orbiting the Sun, more than eleven times wider than Earth."),
    ("How do I remove a coffee stain from a shirt?",
     "Rinse a fresh coffee stain with cold water from the back of the fabric, then rub in a little liquid "
     "detergent before washing."),
    ("Why do we have leap years?",
     "An extra day is added to February every four years because the Earth takes about a quarter of a day "
     "longer than 365 days to orbit the Sun."),
    ("What does a compiler do?",
     "A compiler translates source code written by programmers into machine instructions a computer can "
     "run."),
    ("How do birds know where to migrate?",
     "Migrating birds navigate using the position of the Sun and stars, the Earth's magnetic field and "
     "familiar landmarks."),
    ("What is the main ingredient of guacamole?",
     "Guacamole is made mostly from mashed ripe avocados, seasoned with lime, salt and onion."),
    ("Why does ice float on water?",
     "Water expands when it freezes, so ice is less dense than liquid water and floats on top."),
    ("How can I make my phone battery last longer?",
     "Lowering screen brightness and closing apps that run in the background make a phone's battery last "
     "longer."),
    ("What is photosynthesis?",
     "Photosynthesis is the process by which plants use light, water and carbon dioxide to make sugar and "
     "release oxygen."),
    ("Who wrote the play Romeo and Juliet?",
     "Romeo and Juliet is a tragedy written by William Shakespeare in the 1590s."),
    ("How fast does sound travel in air?",
     "In air at room temperature, sound travels at roughly 343 metres per second."),
    ("Why should bread dough be kneaded?",
     "Kneading develops the gluten in the dough, giving bread its stretchy structure and helping it rise."),
]

DISTRACTORS: list[str] = [  # most share a topic with a query without answering it (hard negatives)
    "Honey bees live in colonies ruled by a single queen that lays all the eggs.",
    "Sunsets often look red and orange, especially after a dusty day.",
    "Eggs keep longer in the fridge than at room temperature.",
    "High tide is the best time to launch a small boat from the slipway.",
    "A bicycle chain must be replaced once it has stretched too far.",
    "The Moon takes about twenty-seven days to orbit the Earth.",
    "Water boils faster in a pan with a lid on it.",
    "Some vaccines need a booster dose after several years.",
    "Red pandas are only distantly related to giant pandas.",
    "Painters have tried to capture the colours of the rainbow for centuries.",
    "Evergreen trees keep their needles all winter.",
    "Houseplants grow towards the window because they need light.",
    "Sydney is the largest city in Australia and famous for its harbour.",
    "Solar panels work best when they face the Sun directly.",
    "Dogs wag their tails for many different reasons.",
    "Too much coffee late in the day can keep people awake at night.",
    "Central banks raise interest rates when prices rise too quickly.",
    "Mount Everest is the highest mountain above sea level.",
    "Saturn is famous for its bright rings of ice and rock.",
    "Red wine stains are hard to remove from a white tablecloth.",
    "February is the shortest month of the year.",
    "Programmers use debuggers to find mistakes in their code.",
    "Many birds sing most loudly at dawn in the spring.",
    "Avocado trees need a warm climate and plenty of water.",
    "Icebergs are huge blocks of ice that broke off glaciers.",
    "Phone batteries slowly lose capacity as they age.",
    "Plants need water and minerals from the soil to grow.",
    "Shakespeare's plays are still performed around the world.",
    "Light travels much faster than sound, so we see lightning before we hear thunder.",
    "Fresh bread is often sold early in the morning at bakeries.",
]

LM_TEXT = """\
The small town sits at the bend of a wide, slow river. Every morning the baker opens his shop before \
sunrise, and the smell of fresh bread drifts along the main street. Fishermen walk down to the \
harbour with their nets, while children hurry past them on the way to school.

In the spring the fields around the town turn green, and farmers plant wheat, barley and potatoes. \
The weather can change quickly: a bright morning may end with heavy rain, so most people carry an \
umbrella wherever they go. When the river floods, the lower streets fill with water and the old \
stone bridge is closed for a few days.

The town library is housed in a former railway station. Its shelves hold thousands of books, maps \
and old newspapers, and on Saturday afternoons a retired teacher reads stories to the youngest \
visitors. Students come in the evening to study, because the reading room is quiet and warm.

Once a year the town holds a summer festival. Musicians play in the square, families share long \
tables of food, and the celebration ends with fireworks over the water. Visitors from nearby \
villages say it is the best night of the year, and many of them return the following summer.
"""


def retrieval_corpus() -> tuple[list[str], list[str], list[int]]:
    """``(queries, passages, relevant)``: every query, the corpus (relevant passages in query order,
    then the distractors) and, per query, the index of its one relevant passage in the corpus."""
    queries = [q for q, _ in RETRIEVAL]
    passages = [p for _, p in RETRIEVAL] + list(DISTRACTORS)
    return queries, passages, list(range(len(RETRIEVAL)))
