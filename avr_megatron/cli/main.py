def main(argv=None):
    raise SystemExit("avr: not yet")
