"""A simulated customer-support world: prompts over 14 topics and responses of varying quality.

A prompt is one customer complaint, ``"Customer: My delivery for order 4821 has not arrived yet.\\nAgent:"``;
the response follows after a space. Every complaint of a topic contains the topic's key word
("delivery") and every right action repeats it ("Check the tracking link for your delivery."), as a
good agent echoes the customer: a tiny model learns the topic -> action match from that overlap.
Every response is built from independent parts, so that each part can be sampled on its own and
scored on its own (``gold.py``)::

    [opener] [action] [filler] [rude | irrelevant] [offer]

- ``opener``: empathetic ("Thank you for reaching out."), flat ("Okay.") or absent;
- ``action``: the right action for the prompt's topic, a generic one, or another topic's action;
- ``filler``: a verbose sentence that says nothing (or absent): concision;
- ``rude | irrelevant``: a rude remark, an off-topic remark, or neither;
- ``offer``: an offer of further help (or absent).

``DEMO_MIX`` samples each part so that the average demonstration is mediocre: SFT imitates that
average and RLHF has room to improve on it. The ``"eval"`` split draws from the same complaint
templates (as a held-out set of the same distribution would) but with greetings, closings and slot
values (order numbers, items, amounts, days, codes) never seen in ``"train"``, so no eval prompt is
a train prompt.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Mapping

import numpy as np

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Topic:
    """One kind of customer issue."""

    name: str
    templates: tuple[str, ...]
    """Complaints with ``{order}``, ``{item}``, ``{amount}``, ``{days}`` or ``{code}`` slots."""
    cue: str
    """Regex for the topic's key word, which every complaint of the topic contains (lower case)."""
    actions: tuple[str, ...]
    """Paraphrases of the right action; each contains ``signature`` and repeats the key word."""
    signature: str
    """Regex that recognises this topic's action in any response (lower case)."""


TOPICS: tuple[Topic, ...] = (
    Topic(
        "late_order",
        ("My delivery for order {order} has not arrived yet.", "Where is my delivery? Order {order} is late.",
         "I am still waiting for the delivery of my {item}.", "The delivery of my {item} was due {days} ago.",
         "Order {order} is late and the delivery is still not here."),
        "delivery",
        ("Check the tracking link for your delivery.", "You can follow the delivery with the tracking number.",
         "I have sent you the delivery tracking details again."),
        r"\btracking\b",
    ),
    Topic(
        "refund_request",
        ("I want a refund for my {item}.", "Can I get a refund for order {order}?",
         "Please refund the {amount} I paid for the {item}.", "I returned the {item} but I have no refund yet.",
         "I would like a refund for the {item}, please."),
        "refund",
        ("I have started a refund to your card.", "Your refund will arrive within five business days.",
         "We will process your refund today."),
        r"\brefund",
    ),
    Topic(
        "password_reset",
        ("I forgot my password.", "How do I reset my password?", "My password does not work anymore.",
         "I need a new password for my account.", "I cannot remember the password for my account."),
        "password",
        ("I have sent a password reset link to your email.", "Use the password reset link we just emailed you.",
         "Click the password reset link on the login page."),
        r"\breset link\b",
    ),
    Topic(
        "damaged_item",
        ("My {item} arrived broken, I need a replacement.", "The {item} from order {order} is damaged. Can I get a replacement?",
         "The box was crushed and the {item} is cracked, so I want a replacement.",
         "My {item} came with a broken part and needs a replacement.",
         "I opened the box and the {item} was damaged, please send a replacement."),
        "replacement",
        ("I have arranged a replacement for your item.", "We will ship your replacement today.",
         "Your replacement is on its way."),
        r"\breplacement\b",
    ),
    Topic(
        "billing_error",
        ("There is a double charge for order {order}.", "My bill has a wrong charge of {amount}.",
         "There is a charge of {amount} I did not make.", "You put a charge of {amount} on my bill by mistake.",
         "My card has the same charge of {amount} twice."),
        "charge",
        ("I have adjusted the charge on your bill.", "The extra charge has been adjusted.",
         "We adjusted the charge on your next statement."),
        r"\badjusted\b",
    ),
    Topic(
        "cancel_subscription",
        ("I want to cancel my subscription.", "Please stop my subscription.", "How do I end my subscription?",
         "Cancel my subscription before the next payment.", "I no longer want the subscription, please cancel it."),
        "subscription",
        ("I have closed your subscription.", "Your subscription is closed from today.",
         "The subscription is closed, so no more payments."),
        r"\bclosed\b",
    ),
    Topic(
        "change_address",
        ("I need to change my shipping address.", "I moved and my address is wrong.",
         "Please send order {order} to my new address.", "Can I update the shipping address for my {item}?",
         "My address changed last week, can you fix it?"),
        "address",
        ("I have updated the shipping address on your order.", "Your new address is now on your account.",
         "The address on your order is changed."),
        r"\baddress\b",
    ),
    Topic(
        "wrong_item",
        ("I ordered a {item} but got something else. I want an exchange.", "You sent me the wrong item, I need an exchange.",
         "Order {order} contains the wrong product, can I exchange it?", "This is not the {item} I ordered, please exchange it.",
         "I received a {item} that I never ordered and want an exchange."),
        "exchange",
        ("I have emailed you a return label for the exchange.", "Use our return label to start the exchange.",
         "Your exchange is set up, and a return label is in your inbox."),
        r"\breturn label\b",
    ),
    Topic(
        "account_locked",
        ("My account is locked and I cannot sign in.", "I cannot sign in, it says my account is blocked.",
         "I am locked out and cannot sign in.", "Why can I not sign in? My account was suspended.",
         "My account got locked after I tried to sign in."),
        "sign in",
        ("I have unlocked your account, so sign in again.", "I unlocked the account, so you can sign in now.",
         "Your account is unlocked, and you can sign in again."),
        r"\bunlocked\b",
    ),
    Topic(
        "missing_invoice",
        ("I did not get an invoice for order {order}.", "Where can I find my invoice?", "I need an invoice for my {item}.",
         "My invoice for {amount} is missing.", "Can you send me the invoice for order {order}?"),
        "invoice",
        ("I emailed you a copy of the invoice.", "You can download the invoice from your account page.",
         "The invoice is attached to my last email."),
        r"\binvoice\b",
    ),
    Topic(
        "payment_declined",
        ("My payment was declined.", "My card keeps getting declined at checkout.",
         "Why was my payment for the {item} declined?", "Checkout says my card was declined.",
         "I tried to pay for order {order} but it was declined."),
        "declined",
        ("Check your card details, then retry the declined payment.",
         "Update your card details and retry the declined payment.",
         "The payment was declined, so confirm your card details."),
        r"\bcard details\b",
    ),
    Topic(
        "warranty_claim",
        ("My {item} stopped working. Is it under warranty?", "Is my {item} still under warranty?",
         "The {item} I bought last year does not turn on. Does the warranty cover it?",
         "I want to use the warranty for my {item}.", "Does the warranty cover my {item}? It stopped working."),
        "warranty",
        ("I have opened a warranty claim for your item.", "Your warranty covers a repair, and I booked it.",
         "We will repair it under the warranty."),
        r"\bwarranty\b",
    ),
    Topic(
        "discount_code",
        ("My discount code {code} is not working.", "The discount code {code} was not applied to my order.",
         "I forgot to use my discount code {code}.", "Why does the code {code} give no discount?",
         "The discount code {code} says it is invalid."),
        "discount",
        ("I have applied the discount to your order.", "The discount is now added to your order.",
         "I put the discount on your order by hand."),
        r"\bdiscount\b",
    ),
    Topic(
        "app_crash",
        ("The app crashes when I open it.", "Your app keeps freezing on my phone.", "The app closes every time I log in.",
         "I cannot use the app, it shows an error.", "The mobile app crashed again this morning."),
        r"\bapp\b",
        ("Update the app to the latest version.", "The latest version of the app fixes this.",
         "Reinstall the app and get the latest version."),
        r"\blatest version\b",
    ),
)
TOPIC_BY_NAME: Mapping[str, Topic] = {t.name: t for t in TOPICS}

GENERIC_ACTIONS = ("Let me look into this for you.", "Our team will check this soon.",
                   "You can call our main phone line.")
EMPATHY_OPENERS = ("Thank you for reaching out.", "Thanks for your patience, glad to help.",
                   "I'm sorry about this, happy to help.", "I appreciate you letting us know.")
FLAT_OPENERS = ("Okay.", "Noted.", "Hello.")
FILLERS = ("This note comes from our service desk.", "This reply follows our standard process.",
           "Requests are handled in the order received.", "Our records are reviewed every month.")
RUDE_REMARKS = ("That is not my problem.", "Stop complaining.", "You should have read the instructions.",
                "This is your own fault.")
IRRELEVANT_REMARKS = ("It is raining here today, by the way.", "Our cafeteria serves pasta on Fridays.",
                      "Did you watch the football game last night?", "I just got back from my vacation.")
OFFERS = ("Let me know if you need anything else.", "Is there anything else you need from us?",
          "If you need anything else, just reply here.", "Reply here if you need further assistance.")

_GREETINGS: Mapping[Split, tuple[str, ...]] = {
    "train": ("", "Hi. ", "Hello. ", "Hey there. ", "Good morning. "),
    "eval": ("Hi again. ", "Good evening. ", "Hello team. "),
}
_CLOSINGS: Mapping[Split, tuple[str, ...]] = {
    "train": ("", " Please help.", " This is frustrating.", " Can you help?", " Thanks."),
    "eval": (" Please reply soon.", " I need this fixed.", " Thank you."),
}
_SLOTS: Mapping[Split, Mapping[str, tuple[str, ...]]] = {
    "train": {
        "order": tuple(str(n) for n in range(1000, 7000, 7)),
        "item": ("blue jacket", "coffee maker", "desk lamp", "phone case", "yoga mat", "backpack",
                 "water bottle", "headphones", "toaster", "rain boots", "wall clock", "gaming mouse",
                 "bed sheets", "kettle", "sunglasses", "notebook"),
        "amount": tuple(f"${n}" for n in range(10, 90)),
        "days": ("three days", "a week", "five days", "ten days"),
        "code": ("SAVE10", "SPRING20", "WELCOME5", "FRIEND15", "HOLIDAY30"),
    },
    "eval": {
        "order": tuple(str(n) for n in range(7000, 10000, 7)),
        "item": ("camping tent", "picture frame", "soup pot", "winter gloves", "keyboard", "flower vase"),
        "amount": tuple(f"${n}" for n in range(90, 200)),
        "days": ("two weeks", "a month"),
        "code": ("SUMMER15", "AUTUMN25", "VIP40"),
    },
}
_SLOT_RE = re.compile(r"\{(\w+)\}")


def format_prompt(complaint: str) -> str:
    """The prompt text for one customer message (the response follows after a space)."""
    return f"Customer: {complaint}\nAgent:"


def customer_text(prompt: str) -> str:
    """The last customer message in a prompt (the whole prompt if it has no ``Customer:`` turn)."""
    text = prompt.rsplit("Customer:", 1)[-1]
    return text.split("\nAgent:", 1)[0].strip()


def topic_of(prompt: str) -> Topic | None:
    """The topic whose cue matches the customer's message (the first in ``TOPICS`` order), or None."""
    text = customer_text(prompt).lower()
    return next((t for t in TOPICS if re.search(t.cue, text)), None)


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_prompt(rng: np.random.Generator, split: Split = "train") -> tuple[str, Topic]:
    """A random complaint of a random topic (uniform over topics), from the given split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    topic = TOPICS[int(rng.integers(len(TOPICS)))]
    complaint = _SLOT_RE.sub(lambda m: _choice(rng, _SLOTS[split][m.group(1)]), _choice(rng, topic.templates))
    return format_prompt(_choice(rng, _GREETINGS[split]) + complaint + _choice(rng, _CLOSINGS[split])), topic


@dataclasses.dataclass(frozen=True)
class Mix:
    """Probabilities of each response part; the action is wrong with prob. ``1 - correct - generic``."""

    empathy: float = 0.35
    """Empathetic opener (else a flat opener or none, evenly)."""
    correct: float = 0.5
    """The topic's own action."""
    generic: float = 0.3
    """A generic action that fits any topic."""
    filler: float = 0.35
    """A verbose sentence that adds nothing."""
    rude: float = 0.15
    """A rude remark."""
    irrelevant: float = 0.15
    """An off-topic remark (never together with a rude one)."""
    offer: float = 0.35
    """An offer of further help."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Mix.{field.name} must be a probability, got {value}")
        if self.correct + self.generic > 1.0 or self.rude + self.irrelevant > 1.0:
            raise ValueError(f"Mix: correct + generic and rude + irrelevant must each be <= 1, got {self}")


DEMO_MIX = Mix()
"""The demonstrations' mix: the average demonstration is mediocre."""


def sample_response(rng: np.random.Generator, topic: Topic, mix: Mix = DEMO_MIX) -> tuple[str, dict[str, str]]:
    """A response to ``topic`` built from independently sampled parts, and which part was picked.

    The text has no leading space; the parts dict says ``opener`` (empathy/flat/none), ``action``
    (correct/generic/wrong), ``filler``, ``remark`` (rude/irrelevant/none) and ``offer`` (yes/no).
    """
    u = rng.random(5)
    parts: list[str] = []
    if u[0] < mix.empathy:
        opener = "empathy"
        parts.append(_choice(rng, EMPATHY_OPENERS))
    else:
        opener = "flat" if rng.random() < 0.5 else "none"
        if opener == "flat":
            parts.append(_choice(rng, FLAT_OPENERS))
    if u[1] < mix.correct:
        action = "correct"
        parts.append(_choice(rng, topic.actions))
    elif u[1] < mix.correct + mix.generic:
        action = "generic"
        parts.append(_choice(rng, GENERIC_ACTIONS))
    else:
        action = "wrong"
        others = [t for t in TOPICS if t is not topic]
        parts.append(_choice(rng, others[int(rng.integers(len(others)))].actions))
    filler = u[2] < mix.filler
    if filler:
        parts.append(_choice(rng, FILLERS))
    if u[3] < mix.rude:
        remark = "rude"
        parts.append(_choice(rng, RUDE_REMARKS))
    elif u[3] < mix.rude + mix.irrelevant:
        remark = "irrelevant"
        parts.append(_choice(rng, IRRELEVANT_REMARKS))
    else:
        remark = "none"
    offer = u[4] < mix.offer
    if offer:
        parts.append(_choice(rng, OFFERS))
    dims = {"opener": opener, "action": action, "filler": "yes" if filler else "no", "remark": remark,
            "offer": "yes" if offer else "no"}
    return " ".join(parts), dims


def candidate_responses(topic: Topic) -> list[str]:
    """Every response without filler, rude or irrelevant remark, for ``topic``: where the best lies."""
    openers = ("",) + EMPATHY_OPENERS + FLAT_OPENERS
    actions = topic.actions + GENERIC_ACTIONS
    return [" ".join(p for p in (o, a, f) if p) for o in openers for a in actions for f in ("",) + OFFERS]

