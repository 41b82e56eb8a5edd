"""The Space's screenshots (generate.png, understand.png, inpaint.png beside this file), taken with the model the
Space serves by default, the bundled Harmon-Shapes: the demo runs in this process and headless Chromium drives it
with the steps of tests/test_space.py.

    python spaces/screenshots/make_screenshots.py      (harmon-hf[dev,demo], Chromium and its driver installed)
"""

import os
import sys
import tempfile
import time
from pathlib import Path

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

from test_space import Page, _free_port  # noqa: E402  (the browser steps the tests take)

from harmon_hf.demo import launch  # noqa: E402


PROMPT = "a red circle left of a blue square"
QUESTIONS = ("What shape is the red object?", "Where is the red circle relative to the blue square?")
INPAINT_PROMPT = "a red circle left of a green triangle"


def save(page: Page, name: str):
    page.driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)  # the scroll, then the page's own transitions
    page.driver.save_screenshot(str(HERE / f"{name}.png"))
    print(f"wrote {HERE / f'{name}.png'}")


def fix_seed(page: Page, tab: str, seed: int):
    """Sets the seed in the tab's settings, then closes them again for the picture."""
    page.click(f"#{tab}-settings button")
    page.click(f"#{tab}-randomize-seed input")
    page.set_number(f"{tab}-seed", seed)
    page.click(f"#{tab}-settings button")


def generate(page: Page) -> Path:
    """Generates PROMPT with seed 0 and the model's own settings; returns the image, saved for the other tabs."""
    page.type("generate-prompt", PROMPT)
    fix_seed(page, "generate", 0)
    page.click("#generate-run")
    (image,) = page.wait_for(lambda: page.images("gallery"), message="the generated image")
    save(page, "generate")
    path = Path(tempfile.mkdtemp()) / "generated.png"
    image.save(path)
    return path


def understand(page: Page, image: Path):
    page.open_tab("Understand")
    page.upload("chat-image", image, shown=lambda: page.driver.find_elements(By.CSS_SELECTOR, "#chat-image img"))
    bots = lambda: page.driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")
    for count, question in enumerate(QUESTIONS, start=1):
        page.type("question", question, submit=True)
        page.wait_for(lambda: len(bots()) == count and bots()[-1].text and page.idle("chat"),
                      message=f"the answer to {question!r}")
        print(f"{question} -> {bots()[-1].text}")
    save(page, "understand")


def inpaint(page: Page):
    """Paints over the right third of the example (the blue square) and asks for a green triangle there."""
    page.open_tab("Inpaint")
    page.click("td.imageeditor[data-testid=dataset-cell-0-0]")  # TWO_SHAPES, the tab's first example
    page.wait_for(lambda: "Upload an image" not in page.element("#inpaint-editor").text, message="the example image")
    time.sleep(0.5)  # the editor zooms the image to fit its canvas
    canvas = page.element("#inpaint-editor canvas")
    side = min(canvas.rect["width"], canvas.rect["height"])  # the square image, centred, as large as fits
    for row in range(-3, 4):  # horizontal strokes over the right third
        stroke = ActionChains(page.driver).move_to_element_with_offset(canvas, int(side / 6), int(row * side / 8))
        stroke = stroke.click_and_hold()
        for _ in range(6):
            stroke = stroke.move_by_offset(int(side / 18), 0)
        stroke.release().perform()
    page.type("inpaint-prompt", INPAINT_PROMPT)
    fix_seed(page, "inpaint", 0)
    page.click("#inpaint-run")
    page.wait_for(lambda: page.images("inpaint-result"), message="the inpainted image")
    save(page, "inpaint")


def on_a_new_page(url: str, step, *args):
    page = Page(url)
    try:
        return step(page, *args)
    finally:
        page.close()


def main():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.pop("HARMON_MODEL", None)  # the Space's default: the bundled model
    port = _free_port()
    demo = launch(port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}"
    try:
        image = on_a_new_page(url, generate)
        on_a_new_page(url, understand, image)
        on_a_new_page(url, inpaint)
    finally:
        demo.close()


if __name__ == "__main__":
    main()
