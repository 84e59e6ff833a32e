"""Deterministic generator of the bundled SYNTHETIC data (two domains).

Nothing here is real data. Users follow personas so that titles carry real signal:
a photographer who bought a Canon body goes on to buy Canon lenses, batteries, memory
cards and tripods; a horror fan mostly watches horror. Files are written in the
official formats (Amazon 2023 jsonl for electronics, MovieLens 100K for movies), so
the synthetic data goes through exactly the same readers as real data.

    layerviz data synthetic [--out DIR]
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from layerviz.data.formats import ML100K_GENRES

GENERATOR_VERSION = "1"
SEED = 20261130
N_USERS = 2000

# persona -> (category path, brand -> models, device template, brand accessories, generic accessories)
ELECTRONICS: dict[str, dict] = {
    "photographer": dict(
        cats=["Electronics", "Camera & Photo"],
        brands={"Canon": ["EOS R50", "EOS R10", "EOS R8", "EOS R6 Mark II"],
                "Nikon": ["Z50", "Z fc", "Z5", "Z6 II"],
                "Sony": ["Alpha a6400", "Alpha a6700", "ZV-E10", "Alpha 7 IV"],
                "Fujifilm": ["X-T30 II", "X-S20", "X-T5", "X-H2"]},
        device="{brand} {model} Mirrorless Camera Body, 24MP, 4K Video",
        brand_acc=["{brand} 50mm f/1.8 Prime Lens for {brand} Mirrorless Cameras",
                   "{brand} 18-150mm Zoom Lens for {brand} Mirrorless Cameras",
                   "{brand} Rechargeable Lithium-Ion Battery Pack for {model}",
                   "{brand} Dual Battery Charger for {model}"],
        generic=["SanDisk Extreme 128GB SDXC UHS-I Memory Card", "Lexar Professional 64GB SD Card",
                 "Manfrotto Compact Aluminium Camera Tripod", "Peak Design Everyday Camera Sling Bag",
                 "K&F Concept 67mm UV Lens Filter", "Neewer LED Video Light Panel",
                 "Joby GorillaPod Flexible Tripod", "Lowepro Camera Backpack 300 AW",
                 "Camera Lens Cleaning Kit with Air Blower", "Godox Speedlite Camera Flash"]),
    "laptop": dict(
        cats=["Electronics", "Computers & Accessories"],
        brands={"Dell": ["XPS 13", "XPS 15", "Inspiron 14", "Latitude 7440"],
                "Lenovo": ["ThinkPad X1 Carbon", "IdeaPad 5", "Yoga 7", "ThinkPad T14"],
                "HP": ["Spectre x360", "Envy 16", "Pavilion 15", "EliteBook 840"],
                "ASUS": ["Zenbook 14", "Vivobook 15", "ROG Zephyrus G14", "ProArt Studiobook"]},
        device="{brand} {model} Laptop, 16GB RAM, 512GB SSD",
        brand_acc=["{brand} USB-C 65W Laptop Charger for {model}",
                   "{brand} Wireless Keyboard and Mouse Combo",
                   "{brand} USB-C Docking Station",
                   "Replacement Battery for {brand} {model}"],
        generic=["Logitech MX Master 3S Wireless Mouse", "Anker 7-in-1 USB-C Hub",
                 "Samsung T7 1TB Portable External SSD", "Rain Design mStand Laptop Stand",
                 "Tomtoc 15-inch Laptop Sleeve", "Logitech C920 HD Webcam",
                 "Kensington Ergonomic Wrist Rest", "Belkin USB-C to HDMI Adapter",
                 "Targus Laptop Cooling Pad", "Dell 27-inch 4K USB-C Monitor"]),
    "mobile": dict(
        cats=["Electronics", "Cell Phones & Accessories"],
        brands={"Samsung": ["Galaxy S24", "Galaxy A55", "Galaxy Z Flip5", "Galaxy S23 FE"],
                "Apple": ["iPhone 15", "iPhone 15 Pro", "iPhone 14", "iPhone SE"],
                "Google": ["Pixel 8", "Pixel 8 Pro", "Pixel 7a", "Pixel Fold"],
                "Motorola": ["Edge 40", "Moto G Power", "Razr 40", "Moto G Stylus"]},
        device="{brand} {model} Smartphone, 128GB, Unlocked",
        brand_acc=["Clear Shockproof Phone Case for {brand} {model}",
                   "Tempered Glass Screen Protector for {brand} {model}, 3 Pack",
                   "{brand} 25W USB-C Fast Charging Wall Charger",
                   "Leather Wallet Case for {brand} {model}"],
        generic=["Anker 10000mAh Portable Power Bank", "Belkin 15W Wireless Charging Pad",
                 "Anker USB-C to USB-C Cable, 6ft, 2 Pack", "PopSockets Phone Grip",
                 "iOttie Magnetic Car Phone Mount", "JBL Tune Wireless Earbuds",
                 "Spigen Phone Ring Holder", "Joby Smartphone Tripod with Remote",
                 "Mophie 3-in-1 Wireless Charging Stand", "SanDisk 256GB microSD Card"]),
    "gamer": dict(
        cats=["Electronics", "Video Games"],
        brands={"Sony": ["PlayStation 5", "PlayStation 5 Slim", "PlayStation 5 Digital Edition", "PlayStation Portal"],
                "Microsoft": ["Xbox Series X", "Xbox Series S", "Xbox Series X 2TB", "Xbox One X"],
                "Nintendo": ["Switch OLED", "Switch Lite", "Switch", "Switch Sports Bundle"],
                "Valve": ["Steam Deck 512GB", "Steam Deck OLED", "Steam Deck 64GB", "Steam Deck 256GB"]},
        device="{brand} {model} Gaming Console",
        brand_acc=["{brand} Wireless Controller for {model}",
                   "Charging Dock for {brand} {model} Controllers",
                   "Protective Carrying Case for {brand} {model}",
                   "{brand} Official Headset for {model}"],
        generic=["SteelSeries Arctis Nova Gaming Headset", "Razer Kraken Wired Gaming Headset",
                 "HyperX Cloud II Gaming Headset", "Seagate 2TB Game Drive External Hard Drive",
                 "Elden Ring Standard Edition Video Game", "Minecraft Video Game",
                 "Logitech G502 Gaming Mouse", "Corsair K70 Mechanical Gaming Keyboard",
                 "RGB Gaming Mouse Pad, Extended", "Secretlab Gaming Chair Cushion"]),
    "home_theater": dict(
        cats=["Electronics", "Television & Video"],
        brands={"Samsung": ["Crystal UHD 55-Inch", "QLED Q80C 65-Inch", "The Frame 55-Inch", "Neo QLED 75-Inch"],
                "LG": ["C3 OLED 55-Inch", "B3 OLED 65-Inch", "UR9000 50-Inch", "QNED 75-Inch"],
                "Sony": ["Bravia X80K 55-Inch", "Bravia A80L OLED 65-Inch", "Bravia X90L 75-Inch", "Bravia X77L 50-Inch"],
                "TCL": ["Q6 55-Inch", "S4 65-Inch", "QM8 75-Inch", "S3 43-Inch"]},
        device="{brand} {model} 4K Smart TV",
        brand_acc=["{brand} Soundbar with Wireless Subwoofer",
                   "{brand} Replacement Remote Control for {model} TV",
                   "{brand} Wireless Rear Speakers Kit",
                   "TV Wall Mount Bracket for {brand} {model}"],
        generic=["Amazon Fire TV Stick 4K", "Roku Streaming Stick 4K", "Belkin 8K HDMI 2.1 Cable, 6ft",
                 "Sonos Beam Smart Soundbar", "Monster Surge Protector Power Strip",
                 "Universal TV Stand with Swivel Mount", "Mohu Leaf Indoor HDTV Antenna",
                 "Apple TV 4K", "Screen Cleaning Kit for TVs", "Govee LED TV Backlight Strip"]),
    "audiophile": dict(
        cats=["Electronics", "Headphones & Audio"],
        brands={"Sony": ["WH-1000XM5", "WH-1000XM4", "WF-1000XM5", "MDR-7506"],
                "Bose": ["QuietComfort Ultra", "QuietComfort 45", "QuietComfort Earbuds II", "SoundLink Flex"],
                "Sennheiser": ["Momentum 4", "HD 600", "HD 660S2", "IE 200"],
                "Audio-Technica": ["ATH-M50x", "ATH-M40x", "AT-LP120X Turntable", "ATH-R70x"]},
        device="{brand} {model} Headphones",
        brand_acc=["{brand} Replacement Ear Pads for {model}",
                   "{brand} Hard Carrying Case for {model}",
                   "{brand} Balanced Headphone Cable for {model}",
                   "{brand} Bluetooth Transmitter Adapter"],
        generic=["FiiO K5 Pro Headphone Amplifier and DAC", "Schiit Magni Headphone Amp",
                 "AudioQuest DragonFly USB DAC", "Headphone Stand with USB Hub",
                 "Fosi Audio Bluetooth Receiver Amplifier", "Edifier R1280T Powered Bookshelf Speakers",
                 "JBL Flip 6 Portable Bluetooth Speaker", "Vinyl Record Cleaning Kit",
                 "Moondrop Aria In-Ear Monitors", "Gold-Plated 3.5mm to 6.35mm Adapter"]),
    "smart_home": dict(
        cats=["Electronics", "Smart Home"],
        brands={"Amazon": ["Echo Dot 5th Gen", "Echo Show 8", "Echo Studio", "Echo Pop"],
                "Google": ["Nest Mini", "Nest Hub", "Nest Audio", "Nest Hub Max"],
                "Philips Hue": ["Bridge", "Starter Kit", "Play Gradient Lightstrip", "Go Portable Light"],
                "Ring": ["Video Doorbell 4", "Stick Up Cam", "Floodlight Cam", "Alarm Security Kit"]},
        device="{brand} {model} Smart Home Hub",
        brand_acc=["{brand} Smart Plug, Works with {model}",
                   "{brand} Smart Color Bulbs, 4 Pack, Compatible with {model}",
                   "{brand} Wall Mount for {model}",
                   "{brand} Motion Sensor for {model}"],
        generic=["Kasa Smart Wi-Fi Plug Mini, 4 Pack", "Wyze Cam v3 Indoor Security Camera",
                 "Govee Smart LED Strip Lights, 32.8ft", "Ecobee Smart Thermostat Premium",
                 "August Wi-Fi Smart Lock", "Aqara Door and Window Sensor",
                 "Eero 6 Mesh Wi-Fi System", "SwitchBot Smart Switch Button Pusher",
                 "Eufy Security Indoor Cam 2K", "Lutron Caseta Smart Dimmer Switch"]),
    "fitness": dict(
        cats=["Electronics", "Wearable Technology"],
        brands={"Garmin": ["Forerunner 265", "Venu 3", "Fenix 7", "Instinct 2"],
                "Fitbit": ["Charge 6", "Versa 4", "Sense 2", "Inspire 3"],
                "Apple": ["Watch Series 9", "Watch SE", "Watch Ultra 2", "Watch Series 8"],
                "Samsung": ["Galaxy Watch6", "Galaxy Watch6 Classic", "Galaxy Fit3", "Galaxy Watch5 Pro"]},
        device="{brand} {model} GPS Smartwatch and Fitness Tracker",
        brand_acc=["Silicone Sport Band for {brand} {model}",
                   "Replacement Charging Cable for {brand} {model}",
                   "Screen Protector for {brand} {model}, 4 Pack",
                   "Stainless Steel Mesh Band for {brand} {model}"],
        generic=["Polar H10 Heart Rate Monitor Chest Strap", "Shokz OpenRun Bone Conduction Headphones",
                 "Jabra Elite 8 Active Sports Earbuds", "Running Belt Waist Pack with Phone Holder",
                 "Wahoo TICKR Heart Rate Monitor", "Withings Body Smart Scale",
                 "Theragun Mini Massage Gun", "Beats Powerbeats Pro Wireless Earbuds",
                 "Garmin HRM-Pro Plus Heart Rate Strap", "Renpho Smart Body Fat Scale"]),
}

# genre -> (title patterns, word banks); other genres fall back to their nearest neighbour
MOVIE_WORDS = {
    "Horror": (["The {a} {n}", "{n} of the {a} Dead", "Night of the {a} {n}"],
               ["Haunted", "Cursed", "Hollow", "Silent", "Bleeding", "Forsaken", "Crimson", "Rotting"],
               ["House", "Asylum", "Woods", "Doll", "Cellar", "Chapel", "Mirror", "Harvest"]),
    "Sci-Fi": (["{a} {n}", "The {n} Protocol", "Beyond the {a} {n}"],
               ["Quantum", "Stellar", "Cyber", "Galactic", "Android", "Orbital", "Neon", "Ion"],
               ["Horizon", "Frontier", "Odyssey", "Colony", "Nebula", "Singularity", "Station", "Drift"]),
    "Romance": (["Love in {n}", "A {a} Kiss", "{a} Hearts in {n}"],
                ["Summer", "Winter", "Midnight", "Sweet", "Secret", "Endless", "Tender", "Paper"],
                ["Paris", "Venice", "Lisbon", "Vienna", "Prague", "Seville", "Kyoto", "Provence"]),
    "Children's": (["The Little {n}", "{a} {n} Adventure", "The {n} Who Could Fly"],
                   ["Magic", "Brave", "Tiny", "Jolly", "Sparkly", "Happy", "Lucky", "Fuzzy"],
                   ["Dragon", "Puppy", "Penguin", "Bunny", "Robot", "Kitten", "Owl", "Elephant"]),
    "War": (["Battle of {n}", "The Last {a} Regiment", "{a} Front at {n}"],
            ["Iron", "Eastern", "Western", "Lost", "Fallen", "Forgotten", "Brave", "Steel"],
            ["Normandy", "Stalingrad", "Midway", "Okinawa", "Verdun", "Arnhem", "Tobruk", "Ardennes"]),
    "Western": (["Gunfight at {n}", "The {a} Rider", "{a} Trail to {n}"],
                ["Lonesome", "Dusty", "Outlaw", "Silver", "Wild", "Rattlesnake", "Golden", "Iron"],
                ["Tombstone", "Laredo", "Dodge City", "Deadwood", "El Paso", "Abilene", "Yuma", "Cheyenne"]),
    "Comedy": (["My {a} {n}", "The {n} Party", "Meet the {a} {n}s"],
               ["Crazy", "Awkward", "Big", "Wacky", "Clumsy", "Lucky", "Goofy", "Naughty"],
               ["Wedding", "Roommate", "Vacation", "Neighbor", "Uncle", "Reunion", "Boss", "Bachelor"]),
    "Crime": (["The {a} Job", "{n} Confidential", "Murder in {n}"],
              ["Italian", "Perfect", "Dirty", "Last", "Big", "Inside", "Midnight", "Double"],
              ["Chicago", "Brooklyn", "Miami", "Vegas", "Boston", "Harlem", "Marseille", "Detroit"]),
    "Documentary": (["Inside the {n}", "The {a} Planet", "Voices of {n}"],
                    ["Hidden", "Frozen", "Living", "Blue", "Secret", "Wild", "Human", "Last"],
                    ["Amazon", "Arctic", "Himalaya", "Sahara", "Reef", "Rainforest", "Ocean", "Savanna"]),
    "Drama": (["The {a} Years", "A {a} Life in {n}", "Letters from {n}"],
              ["Quiet", "Broken", "Long", "Distant", "Golden", "Bitter", "Gentle", "Restless"],
              ["Dublin", "Ohio", "Naples", "Warsaw", "Kansas", "Glasgow", "Lyon", "Montana"]),
    "Action": (["{a} Strike", "Operation {n}", "The {a} Protocol: {n}"],
               ["Lethal", "Maximum", "Rogue", "Critical", "Rapid", "Hard", "Total", "Extreme"],
               ["Thunder", "Viper", "Blackout", "Firestorm", "Overdrive", "Cobra", "Shadow", "Hammer"]),
    "Musical": (["{a} Melody", "Dancing in {n}", "The {a} Songbook"],
                ["Broadway", "Sweet", "Moonlight", "Jazz", "Swing", "Starlight", "Singing", "Velvet"],
                ["Harlem", "Manhattan", "Vienna", "Havana", "Memphis", "Rio", "London", "Paris"]),
}
GENRE_FALLBACK = {"Animation": "Children's", "Adventure": "Action", "Fantasy": "Children's",
                  "Thriller": "Crime", "Mystery": "Crime", "Film-Noir": "Crime"}
MOVIE_GENRES = [g for g in ML100K_GENRES if g != "unknown"]


def _zipf(rng: np.random.Generator, n: int, s: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


def electronics_catalogue() -> list[dict]:
    """Every product: id, title, categories, store, persona, brand, model, kind."""
    items = []
    for persona, spec in ELECTRONICS.items():
        for brand, models in spec["brands"].items():
            for model in models:
                items.append(dict(title=spec["device"].format(brand=brand, model=model), persona=persona,
                                  brand=brand, model=model, kind="device", store=brand))
                for tmpl in spec["brand_acc"]:
                    if "{model}" in tmpl:
                        items.append(dict(title=tmpl.format(brand=brand, model=model), persona=persona,
                                          brand=brand, model=model, kind="model_acc", store=brand))
            for tmpl in spec["brand_acc"]:
                if "{model}" not in tmpl:
                    items.append(dict(title=tmpl.format(brand=brand, model=""), persona=persona,
                                      brand=brand, model=None, kind="brand_acc", store=brand))
        for title in spec["generic"]:
            items.append(dict(title=title, persona=persona, brand=None, model=None, kind="generic",
                              store=title.split()[0]))
    for i, it in enumerate(items):
        it["item_id"] = f"B0DEMO{i:04d}"
        it["categories"] = ELECTRONICS[it["persona"]]["cats"]
    return items


def movie_catalogue(rng: np.random.Generator, n_movies: int = 1200) -> list[dict]:
    """Movies with a primary genre, 0-2 extra genres and a title drawn from that genre's words."""
    movies, used = [], set()
    while len(movies) < n_movies:
        primary = MOVIE_GENRES[int(rng.integers(len(MOVIE_GENRES)))]
        pats, adjs, nouns = MOVIE_WORDS[GENRE_FALLBACK.get(primary, primary)]
        title = pats[int(rng.integers(len(pats)))].format(a=adjs[int(rng.integers(len(adjs)))],
                                                          n=nouns[int(rng.integers(len(nouns)))])
        year = int(rng.integers(1960, 2016))
        full = f"{title} ({year})"
        if full in used:
            continue
        used.add(full)
        extra = rng.choice(MOVIE_GENRES, size=int(rng.integers(0, 3)), replace=False).tolist()
        genres = [primary] + [g for g in extra if g != primary]
        movies.append(dict(item_id=str(len(movies) + 1), title=full, year=year, genres=genres,
                           primary=primary))
    return movies


def _electronics_users(rng: np.random.Generator, items: list[dict]) -> list[tuple]:
    personas = list(ELECTRONICS)
    by = {}
    for idx, it in enumerate(items):
        by.setdefault((it["persona"], it["kind"], it["brand"], it["model"]), []).append(idx)
        if it["kind"] == "generic":
            by.setdefault((it["persona"], "generic*"), []).append(idx)
    pop = _zipf(rng, len(items))
    rows = []
    for u in range(N_USERS):
        persona = personas[int(rng.integers(len(personas)))]
        second = personas[int(rng.integers(len(personas)))]
        brand = list(ELECTRONICS[persona]["brands"])[int(rng.integers(4))]
        model = ELECTRONICS[persona]["brands"][brand][int(rng.integers(4))]
        own = (by[(persona, "device", brand, model)] + by.get((persona, "model_acc", brand, model), [])
               + by.get((persona, "brand_acc", brand, None), []))
        generic = by[(persona, "generic*")]
        seq = [own[0]]
        length = int(np.clip(rng.poisson(9) + 4, 5, 25))
        while len(seq) < length:
            r = rng.random()
            if r < 0.45:
                pool = own
            elif r < 0.75:
                pool = generic
            elif r < 0.88:
                pool = by[(second, "generic*")]
            else:
                pool = list(range(len(items)))
            w = pop[pool] / pop[pool].sum()
            cand = int(rng.choice(pool, p=w))
            if cand not in seq:
                seq.append(cand)
            elif rng.random() < 0.05:
                break
        t = int(rng.integers(1_546_300_800, 1_672_531_200)) * 1000  # 2019-2022, in ms
        uid = f"AEDEMO{u:05d}"
        for idx in seq:
            t += int(rng.integers(3_600, 60 * 86_400)) * 1000
            on_topic = items[idx]["persona"] in (persona, second)
            rating = float(rng.choice([5, 4, 3], p=[0.6, 0.3, 0.1]) if on_topic else rng.choice([5, 4, 3, 2, 1]))
            rows.append((uid, items[idx]["item_id"], rating, t))
    return rows


def _movie_users(rng: np.random.Generator, movies: list[dict]) -> list[tuple]:
    by_genre = {g: [i for i, m in enumerate(movies) if g in m["genres"]] for g in MOVIE_GENRES}
    pop = _zipf(rng, len(movies), 0.9)
    rows = []
    for u in range(1, N_USERS + 1):
        favs = rng.choice(MOVIE_GENRES, size=int(rng.integers(1, 3)), replace=False).tolist()
        length = int(np.clip(rng.poisson(16) + 6, 8, 40))
        fav_pool = sorted({i for g in favs for i in by_genre[g]})
        seq: list[int] = []
        while len(seq) < length:
            pool = fav_pool if rng.random() < 0.8 else list(range(len(movies)))
            cand = int(rng.choice(pool, p=pop[pool] / pop[pool].sum()))
            if cand not in seq:
                seq.append(cand)
        t = int(rng.integers(874_724_710, 893_286_638))  # the ML-100K collection window
        for idx in seq:
            t += int(rng.integers(60, 3 * 86_400))
            liked = any(g in favs for g in movies[idx]["genres"])
            rating = int(rng.choice([5, 4, 3], p=[0.5, 0.4, 0.1]) if liked else rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15]))
            rows.append((u, int(movies[idx]["item_id"]), rating, t))
    return rows


def write_electronics(folder: Path, rng: np.random.Generator) -> None:
    items = electronics_catalogue()
    rows = _electronics_users(rng, items)
    with open(folder / "Electronics.jsonl", "w", encoding="utf-8") as f:
        for uid, iid, rating, t in rows:
            f.write(json.dumps({"rating": rating, "title": "", "text": "", "images": [], "asin": iid,
                                "parent_asin": iid, "user_id": uid, "timestamp": t,
                                "helpful_vote": 0, "verified_purchase": True}) + "\n")
    with open(folder / "meta_Electronics.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"main_category": "All Electronics", "title": it["title"],
                                "categories": it["categories"], "store": it["store"],
                                "features": [], "parent_asin": it["item_id"]}) + "\n")


def write_movies(folder: Path, rng: np.random.Generator) -> None:
    movies = movie_catalogue(rng)
    rows = _movie_users(rng, movies)
    with open(folder / "u.data", "w", encoding="latin-1") as f:
        for u, i, r, t in rows:
            f.write(f"{u}\t{i}\t{r}\t{t}\n")
    with open(folder / "u.item", "w", encoding="latin-1") as f:
        for m in movies:
            flags = "|".join("1" if g in m["genres"] else "0" for g in ML100K_GENRES)
            f.write(f"{m['item_id']}|{m['title']}|01-Jan-{m['year']}||http://example.invalid/{m['item_id']}|{flags}\n")
    with open(folder / "u.genre", "w", encoding="latin-1") as f:
        for i, g in enumerate(ML100K_GENRES):
            f.write(f"{g}|{i}\n")


DOMAINS = {"electronics": write_electronics, "movies": write_movies}


def _current(stamp: Path) -> bool:
    return stamp.exists() and stamp.read_text().strip() == GENERATOR_VERSION


def generate(out: Path) -> Path:
    """Write both synthetic domains under ``out`` (atomically per domain); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for offset, (name, write) in enumerate(DOMAINS.items()):
        target = out / name
        stamp = target / "GENERATED_BY_LAYERVIZ"
        if _current(stamp):
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        try:
            write(tmp, np.random.default_rng(SEED + offset))
            (tmp / "GENERATED_BY_LAYERVIZ").write_text(GENERATOR_VERSION + "\n")
            if _current(stamp):  # another process wrote the same files meanwhile: keep theirs (it may be reading)
                continue
            if target.exists():
                shutil.rmtree(target)
            try:
                tmp.rename(target)
            except OSError:
                if not _current(stamp):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out

