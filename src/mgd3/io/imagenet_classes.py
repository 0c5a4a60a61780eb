"""The ImageNet subsets of the dataset-distillation literature (docs/METHODS.md §4): their
ImageNet-1K wnids in the literature's class order, DiT's labels where fixed, and the class names
of those wnids. Plain tables; `mgd3.io.folders` reads the images.
"""

from __future__ import annotations

import re

# ImageNet subsets (docs/METHODS.md §4), in the literature's class order. DiT label = index of the wnid among
# the sorted 1000 ImageNet-1K wnids.
IMAGENETTE = ("n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 n03417042 n03425413 "
              "n03445777 n03888257").split()
IMAGENETTE_LABELS = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
IMAGEWOOF = ("n02096294 n02093754 n02111889 n02088364 n02086240 n02089973 n02087394 n02115641 "
             "n02099601 n02105641").split()
IMAGEWOOF_LABELS = [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
IMAGENET100 = """n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245
n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 n02877765
n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 n03785016 n03764736
n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888
n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 n03017168
n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 n02089867 n02119022 n03777754
n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 n03494278 n04136333 n03794056 n03492542 n02018207
n04067472 n03930630 n03584829 n02123045 n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089
n03424325 n01855672 n02090622""".split()
IMAGEIDC = IMAGENET100[:10]

# ImageNet-1K class names (the synset lines, "tench, Tinca tinca") of the subset wnids, checked
# against the ILSVRC-2012 synset mapping (LOC_synset_mapping.txt / synset_words.txt).
WNID_NAMES = dict(line.split(" ", 1) for line in """\
n01440764 tench, Tinca tinca
n02102040 English springer, English springer spaniel
n02979186 cassette player
n03000684 chain saw, chainsaw
n03028079 church, church building
n03394916 French horn, horn
n03417042 garbage truck, dustcart
n03425413 gas pump, gasoline pump, petrol pump, island dispenser
n03445777 golf ball
n03888257 parachute, chute
n02096294 Australian terrier
n02093754 Border terrier
n02111889 Samoyed, Samoyede
n02088364 beagle
n02086240 Shih-Tzu
n02089973 English foxhound
n02087394 Rhodesian ridgeback
n02115641 dingo, warrigal, warragal, Canis dingo
n02099601 golden retriever
n02105641 Old English sheepdog, bobtail
n02869837 bonnet, poke bonnet
n01749939 green mamba
n02488291 langur
n02107142 Doberman, Doberman pinscher
n13037406 gyromitra
n02091831 Saluki, gazelle hound
n04517823 vacuum, vacuum cleaner
n04589890 window screen
n03062245 cocktail shaker
n01773797 garden spider, Aranea diademata
n01735189 garter snake, grass snake
n07831146 carbonara
n07753275 pineapple, ananas
n03085013 computer keyboard, keypad
n04485082 tripod
n02105505 komondor
n01983481 American lobster, Northern lobster, Maine lobster, Homarus americanus
n02788148 bannister, banister, balustrade, balusters, handrail
n03530642 honeycomb
n04435653 tile roof
n02086910 papillon
n02859443 boathouse
n13040303 stinkhorn, carrion fungus
n03594734 jean, blue jean, denim
n02085620 Chihuahua
n02099849 Chesapeake Bay retriever
n01558993 robin, American robin, Turdus migratorius
n04493381 tub, vat
n02109047 Great Dane
n04111531 rotisserie
n02877765 bottlecap
n04429376 throne
n02009229 little blue heron, Egretta caerulea
n01978455 rock crab, Cancer irroratus
n02106550 Rottweiler
n01820546 lorikeet
n01692333 Gila monster, Heloderma suspectum
n07714571 head cabbage
n02974003 car wheel
n02114855 coyote, prairie wolf, brush wolf, Canis latrans
n03785016 moped
n03764736 milk can
n03775546 mixing bowl
n02087046 toy terrier
n07836838 chocolate sauce, chocolate syrup
n04099969 rocking chair, rocker
n04592741 wing
n03891251 park bench
n02701002 ambulance
n03379051 football helmet
n02259212 leafhopper
n07715103 cauliflower
n03947888 pirate, pirate ship
n04026417 purse
n02326432 hare
n03637318 lampshade, lamp shade
n01980166 fiddler crab
n02113799 standard poodle
n03903868 pedestal, plinth, footstall
n02483362 gibbon, Hylobates lar
n04127249 safety pin
n03017168 chime, bell, gong
n02093428 American Staffordshire terrier, Staffordshire terrier, American pit bull terrier, pit bull terrier
n02804414 bassinet
n02396427 wild boar, boar, Sus scrofa
n04418357 theater curtain, theatre curtain
n02172182 dung beetle
n01729322 hognose snake, puff adder, sand viper
n02113978 Mexican hairless
n03787032 mortarboard
n02089867 Walker hound, Walker foxhound
n02119022 red fox, Vulpes vulpes
n03777754 modem
n04238763 slide rule, slipstick
n02231487 walking stick, walkingstick, stick insect
n03032252 cinema, movie theater, movie theatre, movie house, picture palace
n02138441 meerkat, mierkat
n02104029 kuvasz
n03837869 obelisk
n03494278 harmonica, mouth organ, harp, mouth harp
n04136333 sarong
n03794056 mousetrap
n03492542 hard disc, hard disk, fixed disk
n02018207 American coot, marsh hen, mud hen, water hen, Fulica americana
n04067472 reel
n03930630 pickup, pickup truck
n03584829 iron, smoothing iron
n02123045 tabby, tabby cat
n04229816 ski mask
n02100583 vizsla, Hungarian pointer
n03642806 laptop, laptop computer
n04336792 stretcher
n03259280 Dutch oven
n02116738 African hunting dog, hyena dog, Cape hunting dog, Lycaon pictus
n02108089 boxer
n03424325 gasmask, respirator, gas helmet
n01855672 goose
n02090622 borzoi, Russian wolfhound
""".splitlines())
WNID = re.compile(r"n\d{8}")  # an ImageNet-1K class folder name
