// SPDX-License-Identifier: GPL-2.0
/* kmt_pkga: exports kmt_pkga_hello; imports only _printk. */
#include <linux/export.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>
#include "kmt_pkga.h"

int kmt_pkga_hello(void)
{
	pr_info("kmt_pkga: hello\n");
	return 0;
}
EXPORT_SYMBOL(kmt_pkga_hello);

static int __init kmt_pkga_init(void)
{
	pr_info("kmt_pkga: loaded\n");
	return 0;
}

static void __exit kmt_pkga_exit(void)
{
	pr_info("kmt_pkga: unloaded\n");
}

module_init(kmt_pkga_init);
module_exit(kmt_pkga_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: reusable symbol provider");
