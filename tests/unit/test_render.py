"""Content as text for channels without a native form, and a customer's numbered answer back."""

from __future__ import annotations

import pytest

from shared.render import LOCATION_PROMPT, NoFallback, answered_choice, choices, fallback, form_response_text
from shared.sunco import (
    BuyAction,
    CarouselContent,
    FormContent,
    FormField,
    FormOption,
    FormResponseContent,
    ImageContent,
    Item,
    LinkAction,
    ListContent,
    LocationContent,
    LocationCoordinates,
    LocationInfo,
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TemplateContent,
    TextContent,
    WebviewAction,
)

QUESTION = TextContent(text="Which plan?", actions=[
    ReplyAction(text="Basic", payload="plan_basic"), LinkAction(text="Compare", uri="https://x.example/plans"),
    PostbackAction(text="Pro", payload="plan_pro"), LocationRequestAction(text="Send location")])


def test_text_with_actions_numbers_the_answerable_ones_and_lists_links() -> None:
    out = fallback(QUESTION)
    assert out.text == ("Which plan?\n\n1. Basic\nCompare: https://x.example/plans\n2. Pro\n" + LOCATION_PROMPT)
    assert [a.payload for a in out.choices] == ["plan_basic", "plan_pro"] == [a.payload for a in choices(QUESTION)]


@pytest.mark.parametrize(("answer", "payload"), [
    ("1", "plan_basic"), (" 2 ", "plan_pro"), ("2.", "plan_pro"), ("#1", "plan_basic"), ("pro", "plan_pro"),
    ("  BASIC ", "plan_basic"), ("3", None), ("0", None), ("12", None), ("yes", None), ("1 2", None)])
def test_an_answer_picks_a_choice_by_number_or_label(answer: str, payload: str | None) -> None:
    picked = answered_choice(answer, QUESTION)
    assert (picked.payload if picked is not None else None) == payload


def test_nothing_to_pick_without_choices() -> None:
    assert answered_choice("1", TextContent(text="hello")) is None


def test_carousel_and_list_items_with_numbered_actions_across_items() -> None:
    items = [Item(title="Red", description="Bright", media_url="https://x.example/red.png",
                  actions=[PostbackAction(text="Pick red", payload="red"),
                           WebviewAction(text="More", uri="https://x.example/red-webview",
                                         fallback="https://x.example/red")]),
             Item(title="Blue", actions=[PostbackAction(text="Pick blue", payload="blue"),
                                         BuyAction(text="Buy", amount=999, currency="usd",
                                                   uri="https://pay.example/1")])]
    carousel = fallback(CarouselContent(items=items, text="Colours"))
    assert carousel.text == ("Colours\n\nRed — Bright\nhttps://x.example/red.png\n1. Pick red\nMore: https://x.example/red"
                             "\n\nBlue\n2. Pick blue\nBuy (9.99 USD): https://pay.example/1")
    listed = ListContent(items=items, actions=[ReplyAction(text="None of these", payload="none")])
    assert [a.payload for a in fallback(listed).choices] == ["red", "blue", "none"]
    picked = answered_choice("3", listed)
    assert picked is not None and picked.payload == "none"


def test_media_location_form_and_form_response() -> None:
    image = fallback(ImageContent(media_url="https://x.example/a.png", text="Look",
                                  actions=[ReplyAction(text="Nice", payload="nice")]))
    assert (image.text, image.media_urls) == ("Look\n\n1. Nice", ["https://x.example/a.png"])
    place = fallback(LocationContent(coordinates=LocationCoordinates(lat=48.85, long=2.35),
                                     location=LocationInfo(name="Shop", address="1 Rue X")))
    assert place.text == "Shop\n1 Rue X\nhttps://maps.google.com/maps?q=48.85,2.35"
    form = FormContent(fields=[FormField(type="text", name="name", label="Your name"),
                               FormField(type="select", name="size", label="Size",
                                         options=[FormOption(name="s", label="Small"),
                                                  FormOption(name="l", label="Large")])])
    assert fallback(form).text == "Please reply with:\nYour name\nSize (Small, Large)"
    answer = FormResponseContent(fields=[FormField(type="text", name="name", label="Your name", text="Ada"),
                                         FormField(type="select", name="size", label="Size",
                                                   select=[FormOption(name="l", label="Large")])])
    assert form_response_text(answer) == "Your name: Ada\nSize: Large" == fallback(answer).text
    with pytest.raises(NoFallback):
        fallback(TemplateContent(template={"name": "hello"}))
