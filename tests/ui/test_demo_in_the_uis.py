"""The demo as a user meets it in the two UIs (`make test-ui`).

Prefect: the demo deployment's Custom run page, its config form set to a tiny run, submitted; the flow
run reaches Completed and its page holds the run's markdown summary. MLflow, on the run's store: the
run, its `eval/accuracy`, and the policy's registered model with version 1 and alias `best`.
Screenshots of every step: artifacts/ui-test/screenshots/.
"""
from __future__ import annotations

import time

from tests.ui.browser import Browser
from tests.ui.prefect_stack import PrefectStack

RUN = "ui-demo"
EXPERIMENT = "iterative-grpo-demo"  # the demo's tracking.experiment, left as the form shows it
MODEL = EXPERIMENT  # the policy's registered model: tracking.registered_model, by default the experiment's name

# A property of the parameters form by its title: the form writes "<Title> (Optional)" for a field with
# a default. The header's own label only, so that a section is not found by a title inside it.
PROPERTY = ("./descendant::div[contains(concat(' ', @class, ' '), ' schema-form-property ')]"
            "[div[@class='p-label__header']//span[@class='schema-form-property__label']"
            "[normalize-space()='{0}' or normalize-space()='{0} (Optional)']][1]")
VALUE = "./div[@class='p-label__body']//*[self::input or self::textarea]"

# One iteration of two steps on 8 held-out questions: a minute or two of a busy 2-core machine.
TINY = {
    ("Data", "Train Size"): 100, ("Data", "Test Size"): 8, ("Sft", "Steps"): 10,
    ("Sampling", "Group Size"): 4, ("Sampling", "Max New Tokens"): 16,
    ("Loop", "Iterations"): 1, ("Loop", "Steps Per Iteration"): 2, ("Loop", "Questions Per Step"): 2,
    ("Loop", "Eval Every"): 2, ("Loop", "Eval Samples"): 2,
    ("Reward Model", "Init Questions"): 4, ("Reward Model", "Init Samples Per Question"): 2,
}
TERMINAL = ("Completed", "Failed", "Crashed", "Cancelled")


def config_field(browser: Browser, *titles: str):
    """The property of the `config` parameter at `titles`, e.g. ("Loop", "Iterations")."""
    element = browser.find("//form")
    for title in ("config", *titles):
        element = browser.find(PROPERTY.format(title), within=element)
    return element


def submit(browser: Browser, prefect: PrefectStack, deployment_id: str) -> dict:
    """Submit the form; the flow run it created, as the API has it. Twice in six runs on a busy 2-core
    machine (CI's included) the page stayed on the form for a minute after the click: a user clicks again,
    and so does this, once, when the API has no run of the deployment 30 s after the first click."""
    button = "//button[@type='submit'][normalize-space()='Submit']"
    browser.click(button)
    runs = poll(lambda: prefect.flow_runs_of(deployment_id), 30)
    if not runs:
        browser.click(button)
        runs = poll(lambda: prefect.flow_runs_of(deployment_id), 90)
    if len(runs) != 1:
        browser.shot("prefect-submit-failed")
        raise AssertionError(f"the form created {len(runs)} flow runs of the demo deployment\n{browser.report()}"
                             f"\n--- server log ---\n{prefect.server_log()}")
    return runs[0]


def poll(check, timeout: float, every: float = 1):
    """`check()`'s first truthy result within `timeout` seconds, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(every)
    return result


def test_demo_run_from_the_prefect_form_shows_up_in_both_uis(mlflow_ui, prefect: PrefectStack, browser: Browser, out):
    t0 = time.monotonic()
    store = out / "store"

    # --- Prefect: the Custom run form of the demo deployment -------------------------------------
    demo = prefect.deployment("iterative-grpo/demo")
    browser.driver.get(f"{prefect.url}/deployments/deployment/{demo['id']}/run")
    browser.find("//span[@class='schema-form-property__label'][normalize-space()='config (Optional)']")
    browser.shot("prefect-custom-run")

    # Run Id is str | None, None by default: choose str (the field is drawn anew), then type
    browser.click(".//button[normalize-space()='str']", within=config_field(browser, "Run Id"))
    browser.type_into(browser.find(VALUE, within=config_field(browser, "Run Id")), RUN)
    for titles, value in TINY.items():
        browser.type_into(browser.find(VALUE, within=config_field(browser, *titles)), value)
    browser.type_into(browser.find(VALUE, within=config_field(browser, "Storage", "Artifacts Root")), store)
    browser.shot("prefect-form-tiny-run")

    # The MLflow UI creates the store's database as it starts: the run, which would too, starts after
    mlflow_ui.wait_healthy()
    flow_run = submit(browser, prefect, demo["id"])
    browser.driver.get(f"{prefect.url}/runs/flow-run/{flow_run['id']}")
    browser.find("//span[contains(@class, 'state-badge')]")
    browser.shot("prefect-flow-run-started")

    done = " or ".join(f"normalize-space()='{s}'" for s in TERMINAL)
    state = browser.find(f"//span[contains(@class, 'state-badge')][{done}]", timeout=300).text.strip()
    assert state == "Completed", f"flow run {state}\n--- worker log ---\n{prefect.worker_log()}"
    browser.shot("prefect-flow-run-completed")

    browser.click("//li[@id='artifacts']")
    browser.click("//*[normalize-space()='run-summary']")
    summary = browser.find("//article[contains(@class, 'artifact-data-markdown')]")  # the markdown, rendered
    browser.find(f".//h1[normalize-space()='Run {RUN}']", within=summary)
    # the form's values reached the run: its iterations, test set and Maj@K samples are the tiny ones
    browser.find(".//div[contains(., 'after 1 iteration(s)') and contains(., '(8 questions, 2 samples each)')]",
                 within=summary)
    browser.shot("prefect-run-summary")

    # --- MLflow: the run, its eval/accuracy, the registered policy -------------------------------
    browser.driver.get(mlflow_ui.url)
    browser.click("//*[normalize-space()='Model training']")  # the UI opens on its GenAI side
    browser.click(f"//a[normalize-space()='{EXPERIMENT}']")
    browser.click(f"//a[normalize-space()='{RUN}']")
    browser.dismiss("//button[@aria-label='Close']")  # the assistant's panel, which halves the page
    search = browser.find("//input[@placeholder='Search metrics']")
    search.send_keys("eval/accuracy")
    browser.scroll_to(browser.find("//h4[starts-with(normalize-space(), 'Metrics')]"), "start")
    browser.find("//div[@role='row'][.//*[normalize-space()='eval/accuracy']]")
    browser.shot("mlflow-run")

    browser.click("//*[normalize-space()='Model registry']")
    browser.dismiss("//div[@role='dialog']//button[@aria-label='Close']")  # a one-time tour of the registry
    browser.click(f"//a[normalize-space()='{MODEL}'][contains(@href, 'models/')]")  # not the experiment's link
    browser.find("//div[@role='row'][.//a[normalize-space()='Version 1']][.//*[@title='best']]")
    browser.shot("mlflow-registry")
    print(f"browser test: {time.monotonic() - t0:.0f} s after the fixtures")
