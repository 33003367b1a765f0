"""Drives the status page in headless Chromium (Debian's chromium and
chromedriver, through selenium): logs in with the token, waits for the
failing state, checks that a destination's answer holding a <script> is
shown as text and never runs, screenshots, clicks Replay on a dead letter
of `billing`, Retry now on `xss` and Resume on the paused `audit`, waits for the page to show
it, screenshots again. Arguments: page URL, token, screenshot directory.
Prints "ok" or fails with a reason.
"""
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.common.exceptions import StaleElementReferenceException, NoSuchElementException
from selenium.webdriver.support.ui import WebDriverWait


def click(driver, css):
    """Clicks `css` as the page has it now (it re-renders every few seconds)."""
    try:
        driver.find_element(By.CSS_SELECTOR, css).click()
        return True
    except (StaleElementReferenceException, NoSuchElementException):
        return False


url, token, shots = sys.argv[1:4]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--no-first-run", "--disable-quic", f"--user-data-dir={tempfile.mkdtemp()}"]:
    opts.add_argument(a)
driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
try:
    driver.set_window_size(1400, 1100)
    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    dests = lambda d: d.find_element(By.ID, "dests").text
    wait.until(lambda d: "billing" in dests(d) and "<script>" in dests(d) and "retrying" in dests(d))
    # Dead letters a transform made are told apart (issue 26).
    wait.until(lambda d: "2 (2 transform failed)" in dests(d))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#dead button[data-id]"))
    assert driver.execute_script("return window.pwned") is None, "a destination's answer ran as script"
    # Issue 23, point 8: the dead-letter table has column headers, and the
    # store's average flush time is read from the metric that exists.
    headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#dead table th")]
    assert "message" in headers and "last status and reason" in headers, headers
    wait.until(lambda d: "ms on average" in d.find_element(By.ID, "store").text
               and "flush - ms" not in d.find_element(By.ID, "store").text)
    # Issue 23, point 8: on a fresh load the sparklines already show the
    # last 15 minutes (kept by the relay): xss's two failed attempts are
    # drawn, not a flat line. Then its Retry now button sends them again.
    def failed_line_drawn(d, name):
        try:
            for row in d.find_elements(By.CSS_SELECTOR, "#dests tr"):
                if row.find_element(By.CSS_SELECTOR, "td").text == name:
                    line = row.find_element(By.CSS_SELECTOR, "polyline[stroke-dasharray]")
                    ys = [float(p.split(",")[1]) for p in line.get_attribute("points").split()]
                    return min(ys) < 23
        except (StaleElementReferenceException, NoSuchElementException):
            return None
        return None

    drawn = wait.until(lambda d: None if (v := failed_line_drawn(d, "xss")) is None else [v])
    assert drawn[0], "xss's failed attempts are not drawn on the first load"
    driver.save_screenshot(f"{shots}/1-failing.png")
    wait.until(lambda d: click(d, "button[data-retry-now='xss']"))
    wait.until(lambda d: click(d, "#dead button[data-id][data-destination='billing']"))
    wait.until(lambda d: click(d, "button[data-destination='audit']"))

    def resumed(d):
        try:
            return d.find_element(By.CSS_SELECTOR, "button[data-destination='audit']").text == "Pause"
        except (StaleElementReferenceException, NoSuchElementException):
            return False

    wait.until(resumed)
    assert driver.execute_script("return window.pwned") is None
    driver.save_screenshot(f"{shots}/2-replayed-and-resumed.png")
    print("ok")
finally:
    driver.quit()
