"""Word lists, the fixed world knowledge base and the sentence templates of the built-in corpus.

Used by :mod:`kititans.data.builtin`. Everything here is constant: the knowledge base never depends on a
seed, so facts are stated the same way in stories, Q/A text and chat answers. Tables are written as
``|``-separated text (``-`` = no value) and parsed once at import.

Story templates use ``str.format`` fields: ``a``/``b``/``c`` are children and ``g`` an adult (``Mom``,
``Dad``, ...), ``h`` a helper (``b`` or ``g``); each has ``name``, ``kind`` (girl/boy/kid), ``he``/``He``,
``him``, ``his``/``His``, ``was`` ("was"/"were") and ``role`` (adults: "mom", ...). ``toy``, ``toy2``,
``food``, ``pet`` and ``ani`` are noun phrases with ``n``, ``pl``, ``bare``, ``a``/``A``, ``the``/``The``,
``adj``, ``name``, ``sound``/``Sound``; ``place`` has ``the``/``The``, ``at``/``At``, ``to``, ``sight``,
``hide``, ``hide2``, ``act``, ``act2``; ``fear``, ``act`` (indoor) and ``help`` are scenes (see FEARS,
INDOOR, HELPS); plus ``day`` (weather), ``time``, ``trait``, ``love``, ``age``, ``num``, ``game``, ``cake``,
``vehicle`` and ``way``.
"""

from __future__ import annotations


def _rows(text: str) -> list[list[str]]:
    """Non-empty, non-comment lines of ``text`` split on ``|`` and stripped."""
    lines = (line.strip() for line in text.strip().splitlines())
    return [[cell.strip() for cell in line.split("|")] for line in lines if line and not line.startswith("#")]


def _opt(cell: str) -> str | None:
    return None if cell == "-" else cell


FEMALE = (
    "Lily Mia Emma Anna Sara Lucy Ella Zoe Ruby Rosa Nora Maya Ava Chloe Grace Hannah Ivy Jade Kate Lena "
    "Molly Nina Olivia Amy Bella Daisy Ellie Fiona Hazel Julia Layla Sophie Clara Poppy Alice Eva"
).split()
MALE = (
    "Tom Ben Max Leo Jack Tim Finn Noah Liam Owen Jake Luke Ryan Theo Oscar Henry Adam Ethan Lucas Milo "
    "Hugo Jonah Eli Kai Omar Ravi Leon Felix Oliver Toby Danny Peter Nick Dev"
).split()
NEUTRAL = "Alex Sam Riley Jordan Charlie Robin Kit Jesse Quinn Rowan".split()  # they/them
PET_NAMES = (
    "Spot Buddy Coco Rex Fluffy Patches Biscuit Peanut Pepper Sunny Whiskers Bubbles Ziggy Muffin Pip "
    "Button Socks Rusty Nibbles Pudding"
).split()
ADULTS = (("Mom", "mom", "f"), ("Dad", "dad", "m"), ("Grandma", "grandma", "f"), ("Grandpa", "grandpa", "m"))
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# ------------------------------------------------------------------------------------- knowledge base
_ANIMALS = """
# name  | plural   | sound   | legs | home             | food                   | baby        | gives | flies
cow       | cows        | moo     | 4 | on a farm        | grass                  | calf        | milk  | no
dog       | dogs        | woof    | 4 | in a doghouse    | bones                  | puppy       | -     | no
cat       | cats        | meow    | 4 | in a house       | fish                   | kitten      | -     | no
duck      | ducks       | quack   | 2 | on a pond        | bugs and seeds         | duckling    | -     | yes
sheep     | sheep       | baa     | 4 | on a farm        | grass                  | lamb        | wool  | no
pig       | pigs        | oink    | 4 | in a pen         | corn                   | piglet      | -     | no
horse     | horses      | neigh   | 4 | in a stable      | hay                    | foal        | -     | no
lion      | lions       | roar    | 4 | in the grassland | meat                   | cub         | -     | no
owl       | owls        | hoot    | 2 | in a tree        | mice                   | owlet       | -     | yes
frog      | frogs       | ribbit  | 4 | in a pond        | flies                  | tadpole     | -     | no
hen       | hens        | cluck   | 2 | in a henhouse    | seeds                  | chick       | eggs  | -
bee       | bees        | buzz    | 6 | in a hive        | nectar from flowers    | -           | honey | yes
mouse     | mice        | squeak  | 4 | in a little hole | cheese                 | -           | -     | no
snake     | snakes      | hiss    | 0 | in the grass     | eggs                   | -           | -     | no
goat      | goats       | maa     | 4 | on a farm        | leaves                 | kid         | milk  | no
bear      | bears       | grr     | 4 | in a cave        | berries                | cub         | -     | no
wolf      | wolves      | awoo    | 4 | in a den         | meat                   | pup         | -     | no
donkey    | donkeys     | hee-haw | 4 | on a farm        | hay                    | foal        | -     | no
bird      | birds       | tweet   | 2 | in a nest        | seeds                  | chick       | -     | yes
fish      | fish        | -       | 0 | in the water     | worms                  | -           | -     | no
rabbit    | rabbits     | -       | 4 | in a burrow      | carrots                | bunny       | -     | no
turtle    | turtles     | -       | 4 | in a pond        | plants                 | -           | -     | no
spider    | spiders     | -       | 8 | in a web         | flies                  | -           | -     | no
ant       | ants        | -       | 6 | in an anthill    | crumbs                 | -           | -     | -
butterfly | butterflies | -       | 6 | in a garden      | nectar from flowers    | caterpillar | -     | yes
elephant  | elephants   | -       | 4 | in the grassland | leaves and grass       | calf        | -     | no
monkey    | monkeys     | -       | - | in the jungle    | bananas                | -           | -     | no
giraffe   | giraffes    | -       | 4 | in the grassland | leaves from tall trees | calf        | -     | no
squirrel  | squirrels   | -       | 4 | in a tree        | nuts                   | -           | -     | -
"""
# name -> (plural, sound, legs, home, food, baby, gives, can_fly); None = not known / not asked about
ANIMALS: dict[str, tuple[str, str | None, int | None, str, str, str | None, str | None, bool | None]] = {
    r[0]: (r[1], _opt(r[2]), None if r[3] == "-" else int(r[3]), r[4], r[5], _opt(r[6]), _opt(r[7]),
           None if r[8] == "-" else r[8] == "yes")
    for r in _rows(_ANIMALS)
}  # fmt: skip
_COLORS = """
the sky | blue           || grass | green        || a banana | yellow     || snow | white
the sun | yellow         || a strawberry | red   || a carrot | orange     || chocolate | brown
a tomato | red           || a lemon | yellow     || milk | white          || a pumpkin | orange
a frog | green           || a crow | black       || a pig | pink          || grapes | purple
a cherry | red           || a fire truck | red   || a school bus | yellow || a polar bear | white
an elephant | gray       || blueberries | blue   || broccoli | green      || corn | yellow
a cloud | white          || an orange | orange  || coal | black          || a lime | green
peas | green             || a flamingo | pink   || an eggplant | purple  || a zebra | black and white
"""
_PLURAL_THINGS = {"grapes", "blueberries", "peas", "scissors", "gloves"}
COLORS = tuple(
    (x, c, x in _PLURAL_THINGS)
    for line in _COLORS.strip().splitlines()
    for x, c in _rows(line.replace("||", "\n"))
)  # (thing, color, plural)
OPPOSITES = tuple(tuple(p.split("/")) for p in (
    "hot/cold big/small up/down day/night happy/sad fast/slow wet/dry open/closed full/empty loud/quiet "
    "tall/short light/dark in/out soft/hard clean/dirty push/pull yes/no first/last near/far top/bottom "
    "left/right on/off early/late awake/asleep give/take win/lose laugh/cry thick/thin new/old over/under"
).split())  # fmt: skip
_USES = """
a spoon | eating soup         || a cup | drinking milk          || a bed | sleeping
a broom | sweeping the floor  || an umbrella | keeping you dry in the rain || a toothbrush | brushing your teeth
soap | washing your hands     || a crayon | drawing pictures    || a pencil | writing
scissors | cutting paper      || a towel | drying off after a bath || a key | opening a door
a chair | sitting on          || a book | reading               || a ladder | climbing up high
a comb | combing your hair    || a shovel | digging holes       || a bucket | carrying water
a pillow | resting your head  || a clock | telling the time     || a bike | riding
an oven | baking bread        || a fridge | keeping food cold   || a map | finding your way
a backpack | carrying books   || glue | sticking things together || a blanket | keeping you warm
a lamp | giving light         || gloves | keeping your hands warm || a fork | eating food
a plate | holding food        || a net | catching fish        || a kite | flying in the wind
"""
USES = tuple(
    (x, u, x in _PLURAL_THINGS)
    for line in _USES.strip().splitlines()
    for x, u in _rows(line.replace("||", "\n"))
)  # (thing, what it is for, plural)
HOT_COLD = (("the sun", "hot"), ("ice", "cold"), ("snow", "cold"), ("fire", "hot"), ("ice cream", "cold"),
            ("an oven", "hot"), ("a snowman", "cold"), ("hot soup", "hot"), ("an ice cube", "cold"))  # fmt: skip
SHAPES = (("a triangle", 3), ("a square", 4), ("a rectangle", 4), ("a pentagon", 5), ("a hexagon", 6))
WEAR = (("on your feet", "shoes"), ("on your head", "a hat"), ("on your hands when it is cold", "mittens"),
        ("when it rains", "a raincoat"), ("to bed", "pajamas"), ("at the beach", "a swimsuit"))  # fmt: skip

# ------------------------------------------------------------------------------------- story world
COLOR_ADJ = "red blue green yellow orange purple pink brown white".split()
TOYS = tuple(
    "ball|kite|teddy bear|doll|toy car|toy train|boat|drum|robot|yo-yo|toy truck|hat|book|puppet|whistle|"
    "wagon|scarf|bucket|umbrella|balloon".split("|")
)
FOODS = tuple(tuple(p.split("/")) for p in (
    "apple/apples banana/bananas cookie/cookies sandwich/sandwiches orange/oranges muffin/muffins "
    "carrot/carrots strawberry/strawberries pear/pears cupcake/cupcakes peach/peaches cracker/crackers "
    "pancake/pancakes plum/plums cherry/cherries grape/grapes"
).split())  # fmt: skip
WEATHER = ("sunny", "warm", "bright", "windy", "cool", "cloudy", "quiet")
TIMES = ("morning", "afternoon", "day")
TRAITS = ("kind", "happy", "curious", "shy", "playful", "busy", "little", "cheerful", "gentle", "silly")
LOVES = ("to play outside", "to draw pictures", "to sing songs", "to read books", "to run fast", "to dance",
         "to build with blocks", "to look at bugs", "to splash in puddles", "to help at home", "to ask questions",
         "to climb trees")  # fmt: skip
GAMES = ("tag", "hide and seek", "catch", "pretend", "a counting game", "follow the leader")
CAKES = ("chocolate", "strawberry", "vanilla", "lemon", "banana")
SIGHTS_ON_WAY = (
    "cows in a field",
    "tall trees",
    "a big river",
    "a red barn",
    "sheep on a hill",
    "a long bridge",
)
VEHICLES = ("car", "bus", "train")
AGES = tuple(NUMBER_WORDS[3:8])
SMALL_NUMBERS = tuple(NUMBER_WORDS[2:6])
PET_KINDS = ("dog", "cat", "puppy", "kitten", "bunny", "fish")

_PLACES = """
park | the park | at the park | to the park | yes | duck, dog, bird
  a big green tree; a pond with ducks; a tall slide; a red swing
  under a bench; behind a big tree; in the tall grass; next to the pond
  played on the swings; ran on the grass; fed the ducks; went down the slide
forest | the forest | in the forest | to the forest | yes | owl, bird, squirrel, rabbit, bear
  a tall tree; a little stream; a big gray rock; a path of leaves
  under a pile of leaves; behind a big rock; next to an old log; under a bush
  walked on a little path; picked up pine cones; listened to the birds; jumped over a log
beach | the beach | at the beach | to the beach | yes | bird, dog
  a big blue wave; a pink shell; a little crab; a tall sand castle
  in the soft sand; behind a big rock; under a towel; near the water
  built a sand castle; looked for shells; splashed in the water; dug a big hole in the sand
garden | the garden | in the garden | to the garden | yes | bee, bird, frog, butterfly
  a red flower; a little bee; a big sunflower; a row of carrots
  under a flower pot; behind the bushes; next to the carrots; under a big leaf
  watered the flowers; picked red tomatoes; dug in the dirt; looked at the bugs
farm | the farm | at the farm | to the farm | yes | cow, pig, sheep, horse, hen, goat, donkey
  a big red barn; a brown cow; a little pig; a tall haystack
  in the hay; behind the barn; next to the fence; under a cart
  fed the hens; petted a little goat; picked apples; gave hay to the horses
playground | the playground | at the playground | to the playground | yes | dog, bird
  a tall slide; a big sandbox; a red swing; a little bridge
  in the sandbox; under the slide; behind the swings; under a bench
  went down the slide; played on the swings; dug in the sandbox; climbed the monkey bars
lake | the lake | at the lake | to the lake | yes | duck, frog, bird, turtle
  a little boat; a white duck; a green frog; a long dock
  under the dock; near the water; behind a big rock; under a tree
  threw stones into the water; watched the boats; fed the ducks; sat on the dock
zoo | the zoo | at the zoo | to the zoo | yes | lion, goat, owl, elephant, monkey, giraffe
  a big gray elephant; a tall giraffe; a funny monkey; a sleepy lion
  under a bench; near the gate; next to the monkey house; behind a bush
  saw the lions; watched the monkeys play; looked at the elephants; fed the goats
backyard | the backyard | in the backyard | to the backyard | yes | bird, dog, cat, squirrel
  a tall tree; a little bird; a wooden fence; a small swing
  under the porch; behind the tree; in the grass; next to the fence
  played catch; blew bubbles; jumped on the grass; looked for bugs
kitchen | the kitchen | in the kitchen | to the kitchen | no | cat, dog
  a big pot; a bowl of fruit; a warm oven; a plate of cookies
  under the table; in a drawer; next to the sink; under a chair
  helped make lunch; washed the cups; baked cookies; made a fruit salad
school | school | at school | to school | no | fish
  a big chalkboard; a box of crayons; a fish tank; a reading corner
  under a desk; in a cubby; behind the bookshelf; near the door
  sang songs; painted pictures; read a book; played with blocks
library | the library | at the library | to the library | no | -
  a tall shelf of books; a soft rug; a big window; a comfy chair
  under a table; behind a shelf; next to the big chair; on the soft rug
  read picture books; listened to a story; found a book about bears; sat on the soft rug
"""


def _places() -> dict[
    str, tuple[str, str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], bool]
]:
    lines = [line.strip() for line in _PLACES.strip().splitlines()]
    out = {}
    for i in range(0, len(lines), 4):
        key, the, at, to, outdoor, anis = (c.strip() for c in lines[i].split("|"))
        sights, hides, acts = (tuple(x.strip() for x in lines[i + j].split(";")) for j in (1, 2, 3))
        animals = () if anis == "-" else tuple(x.strip() for x in anis.split(","))
        out[key] = (the, at, to, sights, hides, acts, animals, outdoor == "yes")
    return out


# key -> (the, at, to, sights, hiding places, activities (past tense), animals there, outdoor)
PLACES = _places()
# story fields that are one free choice each
STORY_CHOICES = {
    "day": WEATHER, "time": TIMES, "trait": TRAITS, "love": LOVES, "age": AGES, "num": SMALL_NUMBERS,
    "game": GAMES, "cake": CAKES, "vehicle": VEHICLES, "way": SIGHTS_ON_WAY,
}  # fmt: skip

FEARS = tuple(
    _rows("""
# thing | try to | did | why | place
the big slide | go down the big slide | went down the big slide | It was very tall. | playground
the deep water | swim in the lake | swam in the lake | The water looked so deep. | lake
the big waves | walk into the waves | walked into the waves | They were big and noisy. | beach
the tall tree | climb the tall tree | climbed the tall tree | It was so high. | backyard
the big horse | ride the horse | rode the horse | It was so big. | farm
the dark path | walk on the dark path | walked on the dark path | The trees made long shadows. | forest
the first day of school | go into the classroom | went into the classroom | Everything was new. | school
the loud lion | look at the lion | looked at the lion | The lion said, "Roar!" | zoo
""")
)
INDOOR = tuple(
    _rows("""
# let's ... | they ... | more
build a fort | built a big fort with blankets and pillows | They sat inside and told funny stories.
bake cookies | mixed flour, sugar and eggs in a big bowl | Soon the kitchen smelled sweet.
draw pictures | drew a big sun, a green tree and a happy dog | {a.name} used every color in the box.
play a game | played a board game on the floor | {a.name} won two times!
read a book | read a book about a little bear who got lost | {a.name} liked the pictures best.
make a puppet show | made puppets out of old socks | They put on a funny show, and everyone laughed.
have a tea party | had a tea party with all the toys | They drank pretend tea from tiny cups.
dance | danced to happy songs in the living room | They spun around until they were dizzy.
""")
)
HELPS = tuple(
    _rows("""
# problem | what was done | thanks
{a.name} saw an old man. He had many heavy bags. | So {a.name} helped him carry the bags to his car | "Thank you, little one," said the old man.
A little bird fell out of its nest. It could not fly yet. | {g.name} helped {a.name} put the bird back in its nest | The mother bird sang, "Tweet, tweet!"
{b.name} dropped all of {b.his} crayons on the floor. | So {a.name} helped {b.name} pick them up | "Thank you!" said {b.name}.
{g.name} was cleaning the kitchen. There was so much to do. | {a.name} helped dry the cups and sweep the floor | "What a good helper you are!" said {g.name}.
A little kitten was stuck in a tree. It said, "Meow, meow!" | {a.name} ran to get {g.name}, and {g.name} used a ladder to get the kitten down | The kitten purred and rubbed against {a.name}'s legs.
{b.name} fell down and hurt {b.his} knee. | {a.name} helped {b.name} get up and walked with {b.him} to {g.name} | {g.name} put a bandage on the knee, and {b.name} smiled again.
The flowers in the garden looked dry and sad. | So {a.name} got a watering can and gave them water | The next day, the flowers stood up tall.
{b.name} could not reach the top shelf. | {a.name} got a little stool and helped {b.name} get the book | "You are a good friend," said {b.name}.
""")
)

# ------------------------------------------------------------------------------------- story templates
# "== shape | places (* = any) | intro probability", then one line per slot: alternatives separated by "|",
# "~" = leave the slot out; "END:" lists the endings (one or two are used).
INTRO_FIRST = _rows("""
Once upon a time, there was a little {a.kind} named {a.name}. | Once upon a time, there was a {trait} {a.kind} named {a.name}. | There once was a {trait} {a.kind} called {a.name}. | {a.name} was a {trait} little {a.kind}. | Once there was a {a.kind} named {a.name}. {a.He} {a.was} {age} years old.
""")[0]
INTRO_SECOND = [None if s == "~" else s for s in _rows("""
{a.He} loved {love}. | {a.name} loved {love}. | ~ | {a.He} lived in a little house with {a.his} {g.role}. | Every day, {a.name} liked {love}.
""")[0]]  # fmt: skip
DETAILS_OUTDOOR = ("The sky was blue, and the grass was green.", "The sun was warm on {a.his} face.",
                   "Birds were singing in the trees.", "A soft wind blew, and the leaves danced.",
                   "Little white clouds floated in the sky.")  # fmt: skip
DETAILS = ("{a.name} hummed a happy song.", "{a.name} had big brown eyes and a bright smile.",
           "{a.His} {g.role} always knew how to make {a.him} smile.", "{a.name} liked to skip and hop everywhere.",
           "{a.name} had a little {pet.n} named {pet.name}.", "{a.name} liked {place.the} very much.",
           "{a.name} lived in a small house with a red door.", "{a.name} was good at counting and singing.")  # fmt: skip
_STORIES = """
== lost | * | 0.85
{a.name} had {toy.a}. It was {a.his} favorite toy. | {a.His} favorite toy was {toy.a}. {a.He} took it everywhere. | {g.name} gave {a.name} {toy.a}, and {a.name} loved it very much. | {a.name} had a favorite toy. It was {toy.a}.
One {day} {time}, {a.name} took {toy.the} {place.to}. | One day, {a.name} and {g.name} went {place.to}. {a.name} brought {toy.the} too. | On a {day} {time}, {a.name} went {place.to} with {a.his} {toy.bare}.
{a.He} played with {toy.the} for a long time. | {a.name} {place.act}. {a.He} had so much fun. | {a.He} {place.act} and laughed. | {place.At}, {a.name} saw {place.sight}.
When it was time to go home, {a.name} could not find {toy.the}. | After a while, {a.name} looked around. {toy.The} was gone! | Then {a.name} saw that {a.his} {toy.bare} was missing.
{a.name} felt very sad. {a.He} started to cry. | "Oh no! Where is my {toy.n}?" {a.name} said. | {a.name} was worried. {a.He} did not want to lose {a.his} favorite toy. | {a.name}'s eyes filled with tears.
{h.name} saw {a.name} and asked, "What is wrong?" "I lost my {toy.n}," said {a.name}. "I will help you look," said {h.name}. | {h.name} gave {a.name} a hug. "Let's look for it together," {h.he} said. | "Don't worry," said {h.name}. "We will find it."
They looked {place.hide2}, but it was not there. | They looked high and low. | ~ | First they looked {place.hide2}. Nothing was there.
Then {h.name} saw something {toy.adj} {place.hide}. It was {toy.the}! | At last, {a.name} found {toy.the} {place.hide}. | "Look!" said {h.name}. {toy.The} was {place.hide}.
{a.name} was so happy. {a.He} hugged {toy.the} tight. | {a.name} jumped for joy. | "Thank you, {h.name}!" said {a.name}. | {a.name} laughed and danced around.
END: From that day on, {a.name} always took good care of {a.his} {toy.n}. | {a.name} learned to keep {a.his} toys close. | It was a good day, because friends help each other. | {a.name} smiled all the way home.
== friend | * | 0.5
One {day} {time}, {a.name} went {place.to} with {a.his} {g.role}. | One {day} {time}, {a.name} was {place.at}. | {a.name} went {place.to} with {toy.a}.
{a.He} saw a {b.kind} sitting all alone {place.hide}. The {b.kind} looked sad. | {place.At}, {a.name} saw a new {b.kind}. The {b.kind} {b.was} playing alone. | There was a {b.kind} {place.at} that {a.name} did not know.
{a.name} walked over and said, "Hi! My name is {a.name}. What is your name?" "I am {b.name}," said the {b.kind}. | {a.name} felt a little shy, but {a.he} said hello. The {b.kind} smiled. "I am {b.name}," {b.he} said. | "Hello," said {a.name}. "Hello, I am {b.name}," said the {b.kind}.
"Do you want to play with me?" asked {a.name}. {b.name} nodded. | {a.name} asked {b.name} to play {game}. | "Let's play {game}!" said {b.name}.
They played {game} together. They ran and laughed. | They played {game} until they were out of breath. | {a.name} and {b.name} {place.act} together. | They took turns and shared {toy.the}. | They {place.act2}, and then they played {game}.
{b.name} told {a.name} that {b.he} loved {love}. "Me too!" said {a.name}. | {b.name} was good at {game}, and {a.name} was good at making everyone laugh. | {a.name} showed {b.name} {place.sight}. "Wow!" said {b.name}.
Soon, it was time to go home. | When the sun went down, it was time to say goodbye. | Soon the sky turned orange. | {g.name} called, "Time to go home, {a.name}!"
"Will you play with me again tomorrow?" asked {b.name}. "Yes!" said {a.name}. | {a.name} and {b.name} waved goodbye.
END: {a.name} had made a new friend. | Now {a.name} and {b.name} were best friends. | {a.name} learned that saying hello is how you make a new friend.
== share | * | 0.85
{g.name} gave {a.name} {num} {food.pl} for a snack. | {a.name} had {num} {food.pl} in {a.his} bag.
{a.He} took the {food.pl} {place.to}. | Then {a.name} went {place.to} to play. | {a.name} and {g.name} walked {place.to}.
There, {a.name} {place.act}. | First, {a.he} {place.act2} and had lots of fun. | ~
{place.At}, {a.he} saw {b.name}. {b.name} did not have a snack. | {b.name} was {place.at} too. {b.He} looked hungry. | {a.He} met {a.his} friend {b.name}, who had no food.
{a.name} loved {food.pl}. {a.He} did not want to share at first. | {a.name} wanted to eat all the {food.pl} alone. | ~
Then {a.name} thought about how {b.name} felt. | {a.name} remembered that sharing is kind. | {a.name} thought about it. {a.He} remembered what {g.name} always said: "Sharing is caring."
{a.name} gave {b.name} one {food.n}. "Here, this is for you," {a.he} said. | "Do you want one?" asked {a.name}. {a.He} gave {b.name} {food.a}.
{b.name} smiled. "Thank you, {a.name}!" {b.he} said. | {b.name} was very happy.
They sat down and ate the {food.pl} together. | They ate and talked and laughed. | The two friends ate side by side. | ~
Then they played {game} until it was time to go home. | After the snack, {b.name} let {a.name} play with {b.his} {toy.bare}. | "You are a good friend," said {b.name}.
END: Sharing made {a.name} feel warm inside. | {a.name} learned that sharing makes everyone happy. | The {food.pl} tasted even better when they shared them.
== brave | * | 0.85
{a.name} was afraid of {fear.thing}. {fear.why}
One {day} {time}, {a.name} and {g.name} went {place.to}. | One day, {a.name} went {place.to} with {a.his} {g.role}.
{a.name} looked at {fear.thing} and felt scared. "I can't do it," {a.he} said. | {a.name} wanted to {fear.attempt}, but {a.his} legs felt wobbly. | {a.His} tummy felt funny.
{g.name} held {a.his} hand. "You are braver than you think," {g.he} said. | {g.name} smiled and said, "I will be right here with you." | Then {b.name} came over. "I will do it with you!" said {b.name}.
"What if I fall?" asked {a.name}. "Then I will help you up," said {g.name}. | ~
{a.name} took a deep breath. {a.He} counted to three. | {a.name} closed {a.his} eyes and thought of happy things. | ~
Then {a.he} {fear.did}! | Slowly, {a.name} {fear.did}.
It was not scary at all. It was fun! | {a.name} laughed. {a.He} wanted to do it again. | "I did it!" {a.name} said with a big smile. | It was much easier than {a.he} thought.
{g.name} gave {a.name} a big hug. "I am so proud of you," {g.he} said. | ~
END: {a.name} felt brave and proud. | {a.name} learned that being brave means trying even when you are scared. | Now {a.name} was not afraid anymore.
== rainy | park, beach, playground, lake, garden, backyard, zoo | 0.5
One morning, {a.name} looked out the window. It was raining. | It was a gray, rainy day. Big drops fell on the window. | Rain went pitter-patter on the roof of {a.name}'s house. | One {time}, dark clouds filled the sky, and soon it began to rain.
{a.name} wanted to go {place.to}, but it was too wet. | {a.name} felt sad. {a.He} could not play outside.
{a.He} looked at the gray sky. "I wish the rain would stop," {a.he} said. | {a.name} had wanted to play outside all day. | ~
"What can we do today?" {a.name} asked {a.his} {g.role}. | {a.name} sat by the window with {a.his} {toy.bare}.
{g.name} had an idea. "Let's {act.inf}!" {g.he} said. | "We can {act.inf}," said {g.name}.
So they {act.past}. | {a.name} and {g.name} {act.past}.
{act.more}
"This is so much fun!" said {a.name}. | They laughed and laughed. | Even {a.his} {toy.bare} joined the fun.
After a while, the rain stopped. {a.name} saw a big rainbow in the sky. | The rain kept falling, but {a.name} did not mind. | Later, the sun came out, and {a.name} ran outside to jump in the puddles. | By lunch time, the clouds were gone.
END: {a.name} learned that rainy days can be fun too. | It was the best rainy day ever. | {a.name} hugged {g.name}. "Thank you for a fun day," {a.he} said.
== help | * | 0.85
{a.name} was a kind {a.kind} who liked to help. | {a.He} always looked for ways to help {a.his} family and friends. | {g.name} always said, "A kind heart makes the world better."
One {day} {time}, {a.name} was {place.at} with {g.name}. | One {day} {time}, {a.name} went {place.to}.
~ | {place.At}, {a.he} {place.act}. | {a.He} saw {place.sight}.
{help.problem}
"I can help!" said {a.name}. | {a.name} wanted to help. | {a.name} did not wait. {a.He} knew just what to do.
{help.act}.
It was hard work, but {a.name} did not give up. | It took a little while, but {a.name} was patient. | ~
{help.thanks}
{a.name} felt warm and happy inside. | {a.name} smiled a big smile.
Later, {a.name} told {g.name} what {a.he} did. "I am so proud of you," said {g.name}. | ~
END: Helping others is a kind thing to do. | {a.name} was glad {a.he} could help. | {a.name} learned that even a little {a.kind} can be a big help.
== birthday | park, backyard, beach, kitchen, garden | 0.5
Today was {a.name}'s birthday! {a.He} {a.was} {age} years old. | It was a special day. {a.name} was turning {age}!
{a.name} woke up early. {a.He} {a.was} so excited! | {a.name} put on {a.his} best {toy.adj} shirt. | ~
{g.name} made a big {cake} cake. It had {age} candles on top. | There was a {cake} cake with {age} candles.
{a.His} friends came to the party {place.at}. {b.name} came, and so did {c.name}. | {b.name} and {c.name} came to the party {place.at}.
They played {game} and ate {food.pl}. | They played {game}. Then they {place.act}.
{b.name} gave {a.name} a present. It was {toy2.a}! | {a.name} opened a big box. Inside was {toy2.a}.
"Thank you! I love it!" said {a.name}. | {a.name} gave everyone a big hug.
Everyone sang "Happy Birthday" to {a.name}. Then {a.name} made a wish and blew out the candles. | {a.name} made a wish and blew out all {age} candles. | {g.name} lit the candles. {a.name} closed {a.his} eyes, made a wish and blew hard.
What did {a.he} wish for? It was a secret! | ~
{a.name} shared the cake with everyone. | Everyone ate a big piece of cake. It was yummy!
END: It was the best birthday ever. | {a.name} went to bed with a big smile. | {a.name} felt so loved. | "Thank you for the best party," {a.name} said to {g.name}.
== trip | beach, farm, zoo, lake, forest | 0.5
One {day} {time}, {a.name}'s family went on a trip {place.to}. | {g.name} said, "Today we are going {place.to}!" {a.name} was so excited.
They packed a bag with {food.pl} and water. | {a.name} packed {a.his} {toy.bare} in a little bag. | ~
They went by {vehicle}. {a.name} looked out the window and saw {way}. | The {vehicle} ride was long, so they sang songs.
{place.At}, {a.name} saw {place.sight}. | When they got there, {a.name} ran to see {place.sight}.
{a.name} saw {ani.a}. The {ani.n} said, "{ani.Sound}!" | Then {a.name} saw {ani.a}. {a.He} watched it for a long time.
Then they {place.act}. | {a.name} and {g.name} {place.act}.
After that, {a.name} {place.act2}. | {a.name} said, "This is the best day ever!" | ~
They had a picnic and ate {food.pl}. | They sat on a blanket and ate {food.pl}.
At the end of the day, {a.name} was very tired. {a.He} fell asleep on the way home. | When the sun went down, they went home. {a.name} yawned a big yawn. | On the way home, {a.name} sang songs with {g.name}.
END: It was a wonderful trip. | {a.name} could not wait to go back {place.to} again. | {a.name} loved trips with {a.his} family. | {a.name} dreamed about the trip all night.
"""


def _stories() -> dict[str, tuple[tuple[str, ...] | None, float, list[list[str | None]], list[str]]]:
    out: dict[str, tuple[tuple[str, ...] | None, float, list[list[str | None]], list[str]]] = {}
    slots: list[list[str | None]] = []
    for line in _STORIES.strip().splitlines():
        if line.startswith("=="):
            name, places, p_intro = (c.strip() for c in line[2:].split("|"))
            slots = []
            out[name] = (
                None if places == "*" else tuple(p.strip() for p in places.split(",")),
                float(p_intro),
                slots,
                [],
            )
        elif line.startswith("END:"):
            out[name][3].extend(_rows(line[4:])[0])
        else:
            slots.append([None if alt == "~" else alt for alt in _rows(line)[0]])
    return out


# shape -> (allowed places or None = any, probability of a generic intro, slots, endings)
STORY_SHAPES = _stories()

# ------------------------------------------------------------------------------------- Q/A phrasings
ANIMAL_Q: dict[str, tuple[list[str], list[str]]] = {  # fact -> (full questions, follow-up questions)
    k: (_rows(full)[0], _rows(follow)[0])
    for k, full, follow in (
        ("sound", "What sound does {a} make? | What does {a} say? | Tell me what {a} says. | What noise does {a} make? | Which animal says {sound}? | What do {pl} say?", "What sound does it make? | What does it say?"),
        ("legs", "How many legs does {a} have? | How many legs do {pl} have? | Tell me how many legs {a} has.", "How many legs does it have? | And how many legs does it have?"),
        ("home", "Where does {a} live? | Where do {pl} live? | Tell me where {a} lives. | Where can you find {a}?", "Where does it live? | And where does it live?"),
        ("food", "What does {a} eat? | What do {pl} eat? | What food does {a} like? | Tell me what {a} eats.", "What does it eat? | What does it like to eat?"),
        ("baby", "What is a baby {n} called? | What do we call a baby {n}? | What is the name for a baby {n}?", "What is its baby called? | What do we call its baby?"),
        ("gives", "What does {a} give us? | What do we get from {a}? | What do {pl} give us?", "What does it give us? | What do we get from it?"),
        ("fly", "Can {a} fly? | Is {a} able to fly?", "Can it fly?"),
    )
}  # fmt: skip
COLOR_Q = ("What color {be} {x}?", "What is the color of {x}?", "Tell me the color of {x}.")
OPP_Q = ("What is the opposite of {w}?", "What is the opposite of the word {w}?", "Tell me the opposite of {w}.",
         "What word means the opposite of {w}?")  # fmt: skip
USE_Q = ("What {be} {x} for?", "What do we use {x} for?", "What do you do with {x}?", "Why do we need {x}?")
ADD_Q = ("What is {x} plus {y}?", "What is {x} + {y}?", "Can you add {x} and {y}?", "How much is {x} plus {y}?",
         "If I have {x} and I add {y}, how many do I have?")  # fmt: skip
SUB_Q = ("What is {x} minus {y}?", "What is {x} - {y}?", "What do you get if you take {y} away from {x}?",
         "How much is {x} minus {y}?")  # fmt: skip
AFTER_Q = ("What number comes after {x}?", "What comes after {x}?", "Which number is after {x}?")
BEFORE_Q = ("What number comes before {x}?", "What comes before {x}?", "Which number is before {x}?")
COUNT_Q = (
    "Can you count to {x}?",
    "Count to {x}.",
    "Please count from 1 to {x}.",
    "Count from 1 to {x}, please.",
)
BIGGER_Q = ("Which number is bigger, {x} or {y}?", "Which is more, {x} or {y}?")
DAY_AFTER_Q = ("What day comes after {d}?", "What is the day after {d}?", "Which day is after {d}?")
DAY_BEFORE_Q = ("What day comes before {d}?", "What is the day before {d}?", "Which day is before {d}?")
WEEK_Q = ("What are the days of the week?", "Can you name the days of the week?")
WEEK_LEN_Q = ("How many days are in a week?", "How many days does a week have?")

# ------------------------------------------------------------------------------------- chat
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a friendly teacher for young children.",
                  "You are a kind helper. Answer in short, simple sentences.", "You are a storyteller for little kids.",
                  "You are a helpful assistant. Keep your answers short.", "You are a patient teacher. Use easy words.")  # fmt: skip
SMALL_TALK = tuple(
    tuple(r)
    for r in _rows("""
Hi! | Hello! How can I help you today?
Hello! | Hi there! What would you like to talk about?
Hi there! | Hello! How can I help you today?
Hey! | Hi! What can I do for you?
Good morning! | Good morning! What can I do for you today?
How are you? | I am doing well, thank you! How can I help you?
Hello, how are you? | Hello! I am doing well, thank you. How can I help you today?
What is your name? | I am a small helper. I like to answer questions and tell stories.
Who are you? | I am a friendly helper. I can answer questions and tell you stories.
What can you do? | I can answer simple questions, do easy math, and tell short stories.
Can you help me? | Yes, of course! What do you need help with?
Thank you! | You are welcome!
Thanks! | You are welcome! I am happy to help.
Goodbye! | Goodbye! Have a wonderful day!
Bye! | Bye! See you soon!
Good night! | Good night! Sleep well.
I am sad. | I am sorry you feel sad. Do you want to hear a happy story?
I am happy today! | That is wonderful! I am happy for you.
Do you like stories? | Yes, I love stories! Do you want me to tell you one?
What is your favorite color? | I like blue, like the sky!
What is your favorite animal? | I like cats. A cat says meow!
""")
)
GREETINGS = SMALL_TALK[:7]  # fine to follow with a question
THANKS_USER = ("Thank you!", "Thanks!", "Thank you very much!", "Thanks, that helps!")
THANKS_REPLY = ("You are welcome!", "You are welcome! I am happy to help.", "Any time!")

# short stories for chat answers; fields: N (name), p (Person), k (kind), ka (kind with article), home,
# food, sound/Sound, trait, feel, N2 (another name), k2a, game, toy, at, to, hide, act, sight, day, fear, did,
# num, fpl, fn
MINI_INTRO = ("Once upon a time, there was a little {k} named {N}.", "There once was a {trait} {k} called {N}.",
              "{N} was a little {k} who lived {home}.")  # fmt: skip
MINI_HOMES = (
    "in a little yellow house",
    "in a small town",
    "in a big city",
    "near the sea",
    "on a quiet street",
)
MINI_EXTRA = ("{N} liked to play {game} with {p.his} friends.", "Every day, {N} went for a little walk.",
              "{N} had many friends, and {p.he} liked to help them.", "{p.He} {p.was} small, but {p.he} had a big heart.",
              "{N} loved sunny days.", "Every night, {N} looked at the stars before bed.",
              "{N} liked to sing little songs.")  # fmt: skip
MINI_PLOTS = {  # plot -> (text, follow-up questions and answers)
    "friend": ('One day, {N} met {k2a} named {N2}. "Hello!" said {N}. "Will you be my friend?" {N2} said yes, and they played {game} all day.',
               (("Who did {N} meet?", "{N} met {k2a} named {N2}."), ("What game did they play?", "They played {game}."))),
    "lost": ("One day, {N} lost {p.his} {toy} {at}. {N} looked and looked. At last, {p.he} found it {hide}.",
             (("What did {N} lose?", "{N} lost {p.his} {toy}."), ("Where did {N} find it?", "{N} found it {hide}."))),
    "trip": ("One {day} day, {N} went {to}. {N} {act}. Then {p.he} saw {sight}.",
             (("Where did {N} go?", "{N} went {to}."), ("What did {N} see?", "{N} saw {sight}."))),
    "brave": ('{N} was afraid of {fear}. One day, {N2} said, "I will help you." {N} took a deep breath and {did}. It was not scary at all!',
              (("What was {N} afraid of?", "{N} was afraid of {fear}."), ("Who helped {N}?", "{N2} helped {N}."))),
    "help": ("One day, {N} saw a little bird that fell out of its nest. {N} helped the bird get back home. The bird sang a happy song.",
             (("What did {N} see?", "{N} saw a little bird that fell out of its nest."), ("How did {N} help?", "{N} helped the bird get back home."))),
    "share": ("One day, {N} had {num} {fpl}. {p.His} friend {N2} had none. {N} gave {N2} one {fn}, and they ate together.",
              (("What did {N} share?", "{N} shared {fpl} with {N2}."), ("Who was {N}'s friend?", "{N}'s friend was {N2}."))),
}  # fmt: skip
MINI_FEELINGS = ("happy", "proud", "glad", "safe and happy", "warm and happy")
MINI_CHOICES = {"trait": TRAITS, "feel": MINI_FEELINGS, "game": GAMES, "day": WEATHER[:6]}
MINI_END = ("{N} felt {feel}.", "At the end of the day, {N} felt {feel}.")
STORY_REQ_NAMED = ("Tell me a short story about {ka} named {N}.", "Can you tell me a story about {ka} called {N}?",
                   "Write a short story about {ka} named {N}.", "Tell me a bedtime story about a little {k} named {N}.",
                   "Please tell me a story about {N} the {k}.", "I want a story about {ka} named {N}.")  # fmt: skip
STORY_REQ_FREE = ("Tell me a story.", "Tell me a short story.", "Can you tell me a story about {ka}?",
                  "Tell me a story about {ka}.")  # fmt: skip
RC_ASK = ("{story}\n\n{q}", "Read the story and answer the question.\n\n{story}\n\n{q}", "{story} {q}",
          "Story: {story}\nQuestion: {q}")  # fmt: skip
RC_PLACES = ("park", "forest", "beach", "garden", "farm", "playground", "lake", "zoo", "backyard")
RC_FINDS = (("rock", "shiny"), ("shell", "pink"), ("feather", "blue"), ("leaf", "big"), ("stick", "long"),
            ("flower", "yellow"))  # fmt: skip
RC_FEELINGS = ("happy", "tired", "proud", "excited", "sleepy", "glad")
